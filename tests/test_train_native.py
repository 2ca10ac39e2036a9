"""The C kernels of the bf16 CPU training step (scratchlm.train.native) against torch's own ops:
tanh-GELU, the causal softmax of attention and the cross-entropy rows (values and gradients),
the fused loss's native path against its torch path, results that do not depend on the thread
count, the trainer plugging them in, and exact resume of a bf16 run that uses them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_train_support import TINY, corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.config import load_config
from scratchlm.model import layers
from scratchlm.train import losses, native
from scratchlm.train.losses import fused_linear_cross_entropy
from scratchlm.train.trainer import autocast_context

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason="native kernels unavailable (no C compiler, or SCRATCHLM_NATIVE=0)")

BF16_ULP = 2.0**-7  # relative spacing of bf16 numbers


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def bf16(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


# ---------------------------------------------------------------------------------------------
# GELU


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), seed=st.integers(0, 99))
def test_gelu_tanh_equals_torch_values_and_gradients(rows, cols, seed):
    x = bf16((rows, cols), seed, scale=3.0).requires_grad_()
    g = bf16((rows, cols), seed + 1)
    ours = native.gelu_tanh(x)
    (dx,) = torch.autograd.grad(ours, x, g)
    x64 = x.detach().double().requires_grad_()
    ref = F.gelu(x64, approximate="tanh")
    (dref,) = torch.autograd.grad(ref, x64, g.double())
    assert ours.dtype == dx.dtype == torch.bfloat16
    # one rounding to bf16 of the exact value (plus fp32 arithmetic): within one bf16 ulp
    torch.testing.assert_close(ours.double(), ref, rtol=BF16_ULP, atol=1e-6)
    torch.testing.assert_close(dx.double(), dref, rtol=BF16_ULP, atol=1e-5)


def test_gelu_tanh_keeps_nan_and_infinities_as_torch_does():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -3.0], dtype=torch.bfloat16)
    ours, ref = native.gelu_tanh(x), F.gelu(x, approximate="tanh")
    assert torch.isnan(ours[0]) and ours[1] == float("inf")
    torch.testing.assert_close(ours[3:], ref[3:])


# ---------------------------------------------------------------------------------------------
# Causal softmax


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), t=st.integers(1, 40), scale=st.floats(0.05, 2.0), seed=st.integers(0, 99))
def test_causal_softmax_equals_the_masked_softmax(batch, t, scale, seed):
    s = bf16((batch, t, t), seed, scale=4.0).requires_grad_()
    gp = bf16((batch, t, t), seed + 1)
    ours = native.causal_softmax(s, scale)
    (ds,) = torch.autograd.grad(ours, s, gp)
    s64 = s.detach().double().requires_grad_()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    ref = torch.softmax((s64 * scale).masked_fill(~causal, float("-inf")), dim=-1)
    (dref,) = torch.autograd.grad(ref, s64, gp.double())
    assert torch.all(ours[:, ~causal] == 0) and torch.all(ds[:, ~causal] == 0)
    torch.testing.assert_close(ours.double(), ref, rtol=BF16_ULP, atol=1e-6)
    # the backward reads bf16 probabilities (as torch's bf16 softmax backward does)
    torch.testing.assert_close(ds.double(), dref, rtol=0.02, atol=0.02 * scale * float(gp.abs().max()))


def test_causal_softmax_refuses_non_square_scores():
    with pytest.raises(ValueError, match="square"):
        native.causal_softmax(torch.zeros(2, 3, 4, dtype=torch.bfloat16), 1.0)


# ---------------------------------------------------------------------------------------------
# Cross-entropy rows


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 30), vocab=st.integers(2, 700), seed=st.integers(0, 99), ignored=st.integers(0, 3))
def test_cross_entropy_rows_equal_torch_loss_and_gradient(rows, vocab, seed, ignored):
    logits = bf16((rows, vocab), seed, scale=5.0)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[:ignored] = -1
    exact = logits.double().requires_grad_()
    ref = F.cross_entropy(exact, targets, ignore_index=-1, reduction="none")
    (dref,) = torch.autograd.grad(ref.sum(), exact)
    buffer = logits.clone()
    nll = native.cross_entropy_rows_(buffer, targets)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer.double(), dref, rtol=BF16_ULP, atol=1e-6)


def test_cross_entropy_rows_refuse_targets_out_of_range_and_keep_nan():
    with pytest.raises(IndexError):
        native.cross_entropy_rows_(torch.zeros(2, 5, dtype=torch.bfloat16), torch.tensor([0, 5]))
    logits = torch.zeros(2, 5, dtype=torch.bfloat16)
    logits[1, 3] = float("nan")
    nll = native.cross_entropy_rows_(logits, torch.tensor([1, 1]))
    assert torch.isfinite(nll[0]) and torch.isnan(nll[1])  # so the trainer skips the step


@pytest.mark.parametrize("ignored", [0, 7])
def test_fused_loss_native_path_equals_its_torch_path(monkeypatch, ignored):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(96, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, 300, (96,), generator=g)
    t[:ignored] = -100
    monkeypatch.setattr(losses, "NATIVE_GROUP_ELEMENTS", 40 * 300)  # several groups, a short last one
    calls = []
    real = native.cross_entropy_rows_
    monkeypatch.setattr(native, "cross_entropy_rows_", lambda *a: calls.append(1) or real(*a))

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(h, w, t, chunk_rows=32)
        return (loss, *torch.autograd.grad(loss * 3, (h, w)))

    ours = loss_and_grads()
    assert len(calls) == 3
    monkeypatch.setattr(losses, "_native_applies", lambda *a: False)
    torch_path = loss_and_grads()
    assert len(calls) == 3
    assert ours[0].dtype == torch_path[0].dtype == torch.float32
    # the oracle: the same bf16-rounded operands, in fp64
    h64, w64 = (x.detach().bfloat16().double().requires_grad_() for x in (h, w))
    exact = F.cross_entropy(h64 @ w64.T, t)
    oracle = (exact, *torch.autograd.grad(exact * 3, (h64, w64)))
    for a, b, c in zip(ours, torch_path, oracle):
        error_ours, error_torch = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        assert error_ours <= 2 * error_torch + 1e-6, (error_ours, error_torch)


# ---------------------------------------------------------------------------------------------
# Threads, plumbing, resume


@given(n=st.integers(1, 5000), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_add_bf16_to_f32_equals_cast_then_add(n, seed):
    dst = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    src = bf16((n,), seed + 1, scale=5.0)
    expected = dst + src.float()
    assert native.add_bf16_to_f32_(dst, src) is dst
    assert torch.equal(dst, expected)


def test_add_bf16_to_f32_refuses_mismatched_tensors():
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.add_bf16_to_f32_(torch.zeros(4, dtype=torch.float64), bf16((4,), 0))
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.add_bf16_to_f32_(torch.zeros(5), bf16((4,), 0))


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr(native, "_MIN_SPLIT_ELEMENTS", 1)
    x = bf16((37, 64), 1, scale=3.0)
    s = bf16((3, 29, 29), 2)
    logits, targets = bf16((23, 50), 3), torch.arange(23) % 50

    q = bf16((2, 3, 20, 16), 4)

    def everything():
        buffer = logits.clone()
        attention = (native.causal_attention(q, q, q),) if native.library().causal_attention_available() else ()
        return (native._gelu_forward(x), native.causal_softmax(s, 0.3),
                native.cross_entropy_rows_(buffer, targets), buffer, *attention)

    one = everything()
    torch.set_num_threads(2)
    assert len(native._split_rows(23, 50)) == 2
    two = everything()
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_the_cpu_trainer_plugs_the_kernels_in_only_for_bf16(monkeypatch):
    mlp_input = bf16((2, 8, 16), 0).requires_grad_()
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert layers._TRAINING_KERNELS["gelu_tanh"] is native.gelu_tanh
        assert layers._TRAINING_KERNELS["causal_softmax"] is native.causal_softmax
        assert layers._TRAINING_KERNELS["causal_attention"] is native.causal_attention
        assert layers.gelu(mlp_input, "tanh").grad_fn.name().startswith("_GeluTanh")
        with torch.no_grad():  # evaluation and inference keep torch's ops
            assert layers.gelu(mlp_input, "tanh").grad_fn is None
        assert layers.gelu(mlp_input, "none").grad_fn.name().startswith("Gelu")
    assert layers._TRAINING_KERNELS == {"gelu_tanh": None, "causal_softmax": None, "causal_attention": None}
    with autocast_context(torch.device("cpu"), torch.float16):
        assert layers._TRAINING_KERNELS["gelu_tanh"] is None
    monkeypatch.setattr(native, "_LIBRARY", [None])  # no compiler: torch's ops
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert layers._TRAINING_KERNELS["gelu_tanh"] is None


needs_bf16_attention = pytest.mark.skipif(
    native.library() is None or not native.library().causal_attention_available(),
    reason="the C attention needs a compiler targeting AVX-512 BF16")


@needs_bf16_attention
@given(batch=st.integers(1, 2), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       t=st.integers(1, 40), d=st.sampled_from([16, 32, 64, 80]), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_causal_attention_equals_the_reference_values_and_gradients(batch, kv_heads, group, t, d, seed):
    heads = kv_heads * group
    # [B, T, H, D] storage seen as [B, H, T, D], as the model's projections hand them over
    q = bf16((batch, t, heads, d), seed).transpose(1, 2).requires_grad_()
    k, v = (bf16((batch, t, kv_heads, d), seed + i).transpose(1, 2).requires_grad_() for i in (1, 2))
    grad_out = bf16((batch, heads, t, d), seed + 3)
    out = native.causal_attention(q, k, v)
    out.backward(grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = layers.reference_attention(q64, layers.repeat_kv(k64, group), layers.repeat_kv(v64, group), None)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    for ours, exact in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        scale = exact.abs().max().item() + 1e-3
        assert (ours.double() - exact).abs().max().item() <= 2e-2 * scale


def test_model_attention_through_the_kernel_matches_sdpa():
    q, k, v = (bf16((2, 3, 24, 16), seed).requires_grad_() for seed in range(3))
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        out = layers.attend(q, k, v, None)
    assert out.grad_fn is not None
    if native.library().causal_attention_available():
        assert out.grad_fn.name().startswith("_CausalAttention")
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_bf16_run_with_the_kernels_resumes_bitwise(tmp_path):
    from scratchlm.train.pretrain import pretrain

    tokenizer = train_tokenizer(corpus_texts(60_000), 300)
    data = make_dataset(tmp_path / "data", tokenizer, corpus_texts(60_000))
    sets = [*TINY, "train.dtype=bf16", "model.preset=gpt2-tiny", "train.max_steps=6", "train.ckpt_every=3",
            "train.eval_every=0", "train.keep_checkpoints=5"]
    pretrain(data, tmp_path / "full", load_config(None, sets))
    out = tmp_path / "resumed"
    pretrain(data, out, load_config(None, sets))
    shutil.rmtree(out / "checkpoints" / "step_00000006")  # as if killed after step 3's checkpoint
    (out / "model.safetensors").unlink()
    pretrain(data, out, load_config(None, sets))
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_pass_adamw_equals_the_multi_tensor_update(monkeypatch):
    from scratchlm.train.optim import AdamW

    def run(use_native):
        if not use_native:
            monkeypatch.setattr(native, "_LIBRARY", [None])
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
        opt = AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                    lr=1e-2, betas=(0.9, 0.95))
        for step in range(5):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1)) + 0.1
            opt.step()
        monkeypatch.undo()
        return params, opt.state

    calls = []
    real = native.adamw_step_
    monkeypatch.setattr(native, "adamw_step_", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, ours_state = run(use_native=True)
    assert len(calls) == 10  # 2 parameters x 5 steps, through the kernel
    ref, ref_state = run(use_native=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours_state.values(), ref_state.values()):
        assert a["step"] == b["step"] == 5
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-12)
