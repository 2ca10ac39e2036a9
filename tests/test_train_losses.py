"""The fused output-head + cross-entropy equals the plain `F.cross_entropy(h @ W.T, t)` (the
oracle) in value and gradients, whatever the chunking; inside a model (tied and untied heads) it
gives the same gradients as the model's own logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train_support import one_thread

from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.train.losses import fused_linear_cross_entropy
from scratchlm.train.pretrain import can_fuse_head, next_token_loss_fused


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), vocab=st.integers(2, 40), chunk=st.integers(1, 80), seed=st.integers(0, 99),
       ignored=st.integers(0, 5))
def test_fused_equals_plain_cross_entropy(n, vocab, chunk, seed, ignored):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[:ignored] = -100
    if (t == -100).all():
        return
    plain = F.cross_entropy(h @ w.T, t)
    fused = fused_linear_cross_entropy(h, w, t, chunk_rows=chunk)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(plain * 3, (h, w)), torch.autograd.grad(fused * 3, (h, w))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])  # tied and untied output heads
def test_fused_loss_inside_the_model_gives_the_models_gradients(preset):
    torch.manual_seed(0)
    model = Transformer(model_config(preset, vocab_size=97))
    assert can_fuse_head(model)
    x, y = torch.randint(0, 97, (2, 2, 12)).unbind(0)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    g_plain = grads(plain)
    fused = next_token_loss_fused(model, x, y)
    g_fused = grads(fused)
    torch.testing.assert_close(fused, plain)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head is back in place


def test_fused_loss_is_exact_when_the_target_probability_underflows():
    """-log p[target] from the softmax would be inf once p underflows fp32; those rows must take
    the logsumexp route and still match the oracle (value and gradients)."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(12, 8, generator=g) * 40).requires_grad_()
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    logits = (h @ w.T).detach()
    t = logits.argmin(dim=1)  # the least likely class: probabilities far below 1e-30
    assert (torch.softmax(logits, -1).gather(1, t[:, None]) < 1e-30).any()
    plain = F.cross_entropy(h @ w.T, t)
    fused = fused_linear_cross_entropy(h, w, t, chunk_rows=5)
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(plain, (h, w)), torch.autograd.grad(fused, (h, w))):
        torch.testing.assert_close(a, b)


def test_a_second_backward_through_the_fused_loss_is_refused_not_doubled():
    # backward scales the gradients forward made in place, so running it twice must fail loudly
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.randint(0, 50, (64,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
