"""Sampling: each logit transform against transformers' processors (the oracle), plus properties
of the sampler (greedy = argmax, seeds reproduce, per-row settings are independent)."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.infer.sampling import (
    SamplingParams,
    Sampler,
    apply_frequency_presence,
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k,
    filter_top_p,
)

hf_gen = pytest.importorskip("transformers.generation.logits_process")

V = 50


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy shared machine spinning OpenMP threads
    make each op far slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_logits(seed: int, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 3


def col(value, dtype=torch.float32, batch=4):
    return torch.full((batch, 1), value, dtype=dtype)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_matches_transformers(seed, k):
    logits = random_logits(seed)
    ours = filter_top_k(logits, col(k, torch.long))
    theirs = hf_gen.TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_matches_transformers(seed, p):
    logits = random_logits(seed)
    ours = filter_top_p(logits, col(p))
    theirs = hf_gen.TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.isfinite(ours).sum(-1).min() >= 1


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_matches_transformers(seed, min_p):
    logits = random_logits(seed)
    ours = filter_min_p(logits, col(min_p))
    theirs = hf_gen.MinPLogitsWarper(min_p=min_p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits(1)
    history = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2))
    seen = torch.zeros(4, V, dtype=torch.bool)
    seen.scatter_(1, history, True)
    ours = apply_repetition_penalty(logits, seen, col(penalty))
    theirs = hf_gen.RepetitionPenaltyLogitsProcessor(penalty=penalty)(history, logits.clone())
    assert torch.allclose(ours, theirs)


def test_frequency_and_presence_penalty_formula():
    # OpenAI's definition: logit - count * frequency - (count > 0) * presence.
    logits = random_logits(3)
    counts = torch.randint(0, 4, (4, V), generator=torch.Generator().manual_seed(4))
    out = apply_frequency_presence(logits, counts, col(0.5), col(0.25))
    expected = logits - 0.5 * counts - 0.25 * (counts > 0).float()
    assert torch.allclose(out, expected)


def test_greedy_is_argmax():
    logits = random_logits(5)
    sampler = Sampler(SamplingParams(temperature=0), 4, V)
    assert torch.equal(sampler(logits), logits.argmax(-1))


def test_seed_reproduces_and_differs_between_seeds():
    logits = random_logits(6)
    draws = {}
    for seed in (1, 1, 2):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 4, V)
        draws.setdefault(seed, []).append(torch.stack([sampler(logits) for _ in range(20)]))
    assert torch.equal(draws[1][0], draws[1][1])
    assert not torch.equal(draws[1][0], draws[2][0])


def test_seeded_row_does_not_depend_on_batch_neighbours():
    logits = random_logits(7, batch=3)
    alone = Sampler(SamplingParams(temperature=0.8, seed=9), 1, V)
    a = torch.stack([alone(logits[:1]) for _ in range(10)])
    mixed = Sampler([SamplingParams(temperature=0.8, seed=9), SamplingParams(temperature=0), SamplingParams(seed=3)], 3, V)
    b = torch.stack([mixed(logits) for _ in range(10)])
    assert torch.equal(a[:, 0], b[:, 0])
    assert torch.equal(b[:, 1], logits[1].argmax().expand(10))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = random_logits(8)
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=0), 4, V)
    for _ in range(5):
        assert torch.equal(sampler(logits), logits.argmax(-1))


def test_sampled_tokens_stay_inside_the_filtered_set():
    logits = random_logits(9)
    params = SamplingParams(temperature=1.5, top_k=10, top_p=0.8, min_p=0.05, seed=1)
    sampler = Sampler(params, 4, V)
    allowed = torch.isfinite(sampler.process(logits))
    for _ in range(50):
        tokens = sampler(logits)
        assert allowed[torch.arange(4), tokens].all()


def test_sampling_frequencies_follow_softmax_of_temperature_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(SamplingParams(temperature=0.7, seed=0), 1, 4)
    draws = torch.stack([sampler(logits) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_penalties_use_recorded_history():
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=100.0), 1, 3)
    sampler.record_prompt(0, [0])
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    assert sampler(logits).item() == 1  # token 0 was in the prompt
    assert sampler(logits).item() == 2  # token 1 was just generated


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5), dict(repetition_penalty=0)]
)
def test_bad_parameters_are_user_errors(bad):
    name = next(iter(bad))
    with pytest.raises(UserError, match=name):
        SamplingParams(**bad)


def test_unknown_parameter_named():
    with pytest.raises(UserError, match="top_q"):
        SamplingParams.from_dict({"top_q": 0.5})
