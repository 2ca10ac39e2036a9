"""The DPO losses against hand computations, the paper's formula, and TRL's where installed."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.posttrain.dpo import dpo_loss, reward_metrics, sequence_logps

logp = st.floats(min_value=-60.0, max_value=-0.01, allow_nan=False)
beta_st = st.floats(min_value=0.01, max_value=2.0)


def _tensors(*values):
    return [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in values]


def test_sigmoid_loss_and_gradient_by_hand():
    # pi(chosen) rose 0.5 nats over the reference, pi(rejected) fell 0.5: h = 1.
    pc, pr, rc, rr = _tensors(-1.0, -2.0, -1.5, -1.5)
    beta = 0.1
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-12)
    assert chosen_reward.item() == pytest.approx(0.05)
    assert rejected_reward.item() == pytest.approx(-0.05)
    loss.sum().backward()
    # d/dh -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    g = -beta / (1 + math.exp(0.1))
    assert pc.grad.item() == pytest.approx(g, abs=1e-12)
    assert pr.grad.item() == pytest.approx(-g, abs=1e-12)
    assert rc.grad.item() == pytest.approx(-g, abs=1e-12)  # references are constants in training,
    assert rr.grad.item() == pytest.approx(g, abs=1e-12)  # but the formula is symmetric


def test_ipo_loss_and_gradient_by_hand():
    pc, pr, rc, rr = _tensors(-3.0, -2.0, -2.5, -2.5)
    beta = 0.25
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    h = (-3.0 + 2.5) - (-2.0 + 2.5)  # -1.0
    assert loss.item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(2 * (h - 2.0))
    assert pr.grad.item() == pytest.approx(-2 * (h - 2.0))


def test_conservative_loss_by_hand():
    pc, pr, rc, rr = _tensors(-1.0, -2.0, -1.5, -1.5)
    beta, eps = 0.5, 0.2
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="conservative", label_smoothing=eps)
    z = beta * 1.0
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.sum().backward()
    sig = 1 / (1 + math.exp(-z))
    assert pc.grad.item() == pytest.approx(-beta * ((1 - eps) * (1 - sig) - eps * sig), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(logp, logp, logp, logp, beta_st)
def test_sigmoid_loss_equals_paper_formula(pc, pr, rc, rr, beta):
    # Rafailov et al. 2023, eq. 7, written with probability ratios, and the gradient of eq. (Sec 4):
    # grad = -beta * sigmoid(r(y_l) - r(y_w)) * (grad log pi(y_w) - grad log pi(y_l)).
    ratio_w = math.exp(pc) / math.exp(rc)
    ratio_l = math.exp(pr) / math.exp(rr)
    z = beta * math.log(ratio_w) - beta * math.log(ratio_l)
    paper_loss = -math.log(1 / (1 + math.exp(-z))) if z > -30 else -z
    t = _tensors(pc, pr, rc, rr)
    loss, rw, rl = dpo_loss(*t, beta=beta)
    assert loss.item() == pytest.approx(paper_loss, rel=1e-6, abs=1e-9)
    loss.sum().backward()
    weight = 1 / (1 + math.exp(-(rl.item() - rw.item())))
    assert t[0].grad.item() == pytest.approx(-beta * weight, rel=1e-6, abs=1e-12)
    assert t[1].grad.item() == pytest.approx(beta * weight, rel=1e-6, abs=1e-12)


def test_reward_metrics():
    m = reward_metrics(torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, -3.0]))
    assert m["reward_accuracy"] == pytest.approx(0.75)
    assert m["reward_margin"] == pytest.approx((1 - 1 + 1 + 2) / 4)
    assert m["rewards_chosen"] == pytest.approx(0.5)
    assert m["rewards_rejected"] == pytest.approx(-0.25)


def test_sequence_logps_sums_masked_target_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = sequence_logps(logits, targets, mask)
    for b in range(2):
        expected = sum(
            torch.log_softmax(logits[b, t], -1)[targets[b, t]].item() for t in range(5) if mask[b, t]
        )
        assert got[b].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "conservative"])
def test_equals_trl_when_installed(loss_type):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta, eps = 0.3, 0.1 if loss_type == "conservative" else 0.0
    fake = type("FakeTrainer", (), {})()
    fake.beta, fake.label_smoothing = beta, eps
    fake.loss_type = "sigmoid" if loss_type == "conservative" else loss_type
    fake.reference_free, fake.f_divergence_type, fake.use_weighting = False, "reverse_kl", False
    fake.accelerator = type("Acc", (), {"device": torch.device("cpu")})()
    try:
        out = trl_dpo.DPOTrainer.dpo_loss(fake, pc, pr, rc, rr)
    except Exception as e:  # the private API moves between TRL versions
        pytest.skip(f"TRL's dpo_loss API differs in this version: {e}")
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(ours, out[0].to(ours.dtype))
