"""Optimizers and schedules: AdamW equals torch's AdamW (the oracle) step for step; parameter
groups put decay and Muon where they belong; Newton-Schulz orthogonalises; Muon lowers a loss;
the schedules warm up, peak, and decay to the stated floor."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_support import one_thread
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.config import TrainConfig
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.train.optim import (AdamW, Muon, build_optimizer, muon_parameter_groups,
                                   orthogonalize, parameter_groups)
from scratchlm.train.schedule import lr_factor


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(5, 3), (3,), (2, 2, 2)]]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw(weight_decay):
    ours, theirs = _params(), _params()
    opt_a = AdamW([{"params": ours[:2], "weight_decay": weight_decay}, {"params": ours[2:], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_b = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": weight_decay},
                               {"params": theirs[2:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        for opt in (opt_a, opt_b):  # a schedule changing lr mid-run
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 - step / 40)
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_parameter_groups_decay_matrices_only():
    model = Transformer(model_config("gpt2-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied weight once


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = Transformer(model_config("llama-tiny"))
    groups = muon_parameter_groups(model, 0.1, lr=1e-3, muon_lr=0.02)
    muon = {id(p) for g in groups if g["kind"] == "muon" for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in muon} == {
        n for n, p in model.named_parameters()
        if p.dim() == 2 and n.startswith("layers.")
    }
    assert id(model.tok_embeddings.weight) not in muon and id(model.lm_head.weight) not in muon
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 48)])
def test_newton_schulz_pushes_singular_values_towards_one(shape):
    # singular values spread over two orders of magnitude, as in a real gradient
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T
    s = torch.linalg.svdvals(orthogonalize(g).float())
    # the quintic iteration is tuned for speed, not convergence: singular values land in ~[0.7, 1.2]
    assert s.min() > 0.5 and s.max() < 1.3, s


def test_muon_lowers_a_loss():
    torch.manual_seed(0)
    model = Transformer(model_config("gpt2-tiny", vocab_size=64))
    cfg = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    idx = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@settings(max_examples=60, deadline=None)
@given(max_steps=st.integers(10, 5000), warmup_frac=st.floats(0.0, 0.5),
       schedule=st.sampled_from(["cosine", "wsd", "constant"]), floor=st.floats(0.0, 0.5))
def test_schedules_warm_up_then_never_rise_and_end_at_the_floor(max_steps, warmup_frac, schedule, floor):
    warmup = int(warmup_frac * max_steps)
    f = [lr_factor(s, max_steps=max_steps, warmup_steps=warmup, schedule=schedule, min_lr_ratio=floor)
         for s in range(max_steps + 1)]
    assert all(0.0 < x <= 1.0 + 1e-12 for x in f[:max_steps])
    assert all(b >= a for a, b in zip(f[:warmup], f[1:warmup]))  # warm-up rises
    if warmup:
        assert f[warmup - 1] == pytest.approx(1.0)
    after = f[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # then never rises
    assert f[max_steps] == pytest.approx(1.0 if schedule == "constant" else floor)


def test_cosine_is_halfway_at_the_middle_and_wsd_is_flat_until_its_decay():
    mid = lr_factor(550, max_steps=1000, warmup_steps=100, schedule="cosine", min_lr_ratio=0.0)
    assert mid == pytest.approx(0.5)
    wsd = [lr_factor(s, max_steps=1000, warmup_steps=10, schedule="wsd", decay_fraction=0.2,
                     min_lr_ratio=0.0) for s in range(1001)]
    assert all(x == 1.0 for x in wsd[10:800]) and wsd[900] == pytest.approx(0.5)
    assert math.isclose(lr_factor(0, max_steps=10, warmup_steps=4), 0.25)
