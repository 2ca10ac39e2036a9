"""The CPU training fast paths give the same numbers as the plain ones: the batched-GEMM causal
attention against the written-out reference attention (values and gradients, fp64), the switch
that routes bf16 training through it against SDPA, and the allocator tuning is harmless."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train_support import one_thread

from scratchlm.model import layers
from scratchlm.model.layers import attend, bmm_causal_attention, causal_attention_bmm
from scratchlm.train.cpu_alloc import keep_freed_memory
from scratchlm.train.trainer import autocast_context


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def softmax_attention_fp64(q, k, v):
    """The oracle, written out in fp64 throughout (the model's reference path rounds its
    softmax through fp32, too coarse to hold fp64 gradients to)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(2, 24), d=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 99))
def test_bmm_causal_attention_equals_reference(b, h, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = causal_attention_bmm(q, k, v)
    ref = softmax_attention_fp64(q, k, v)
    torch.testing.assert_close(ours, ref)
    go = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(ours, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, c)


def test_bf16_training_attention_takes_the_bmm_path_and_matches_sdpa(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    k_gqa, v_gqa = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()
    calls = []
    real = layers.causal_attention_bmm
    monkeypatch.setattr(layers, "causal_attention_bmm", lambda *a: calls.append(1) or real(*a))
    attend(q, k, v, None)  # off by default: the model's memory estimates assume SDPA
    assert not calls
    # the CPU trainer turns it on (and plugs in the C attention where it can: tested on its own)
    with autocast_context(torch.device("cpu"), torch.bfloat16), layers.training_kernels():
        out = attend(q, k, v, None)
        out_gqa = attend(q, k_gqa, v_gqa, None)
    assert len(calls) == 2
    sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = sdpa(q.float(), k.float(), v.float(), is_causal=True)
    expected_gqa = sdpa(q.float(), k_gqa.float(), v_gqa.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out_gqa.float(), expected_gqa, atol=3e-2, rtol=3e-2)
    with bmm_causal_attention():
        with torch.no_grad():  # inference keeps SDPA
            attend(q, k, v, None)
        attend(q.float(), k.float(), v.float(), None)  # and so does fp32
    assert len(calls) == 2


def test_keep_freed_memory_is_idempotent_and_tensors_still_work():
    assert keep_freed_memory() == keep_freed_memory()
    x = torch.randn(1 << 20)
    del x
    y = torch.ones(1 << 20)
    assert float(y.sum()) == float(1 << 20)
