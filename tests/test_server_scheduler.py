"""The continuous-batching scheduler (scratchlm.infer.scheduler) without HTTP.

Oracle: requests joining and leaving one shared batch at different times must produce exactly
what each produces generated alone by `scratchlm.infer.generate` (greedy and seeded sampling),
including across KV-cache compactions.
"""

from __future__ import annotations

import random

import pytest
import torch

from scratchlm.infer.generate import generate_ids
from scratchlm.infer.sampling import SamplingParams
from scratchlm.infer.scheduler import GenerationRequest, QueueFull, Scheduler
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer.bpe import BPETokenizer

from server_helpers import TEXTS


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXTS, vocab_size=300, progress=False)


def tiny_model(preset: str, vocab_size: int, ctx: int = 48) -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config(preset, vocab_size=vocab_size, max_seq_len=ctx)).eval()


def drive(scheduler: Scheduler, requests: list[GenerationRequest], rng: random.Random) -> list:
    """Submit requests at random iterations (no worker thread), run until all are done."""
    pending, handles = list(requests), []
    while pending or scheduler.active or scheduler.queue_length:
        if pending and rng.random() < 0.4:
            handles += scheduler.submit_many([pending.pop(0)])
        free = scheduler.max_batch - scheduler.active
        admitted, scheduler._waiting = scheduler._waiting[:free], scheduler._waiting[free:]
        scheduler.iterate(admitted)
    return handles


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_staggered_requests_match_generating_each_alone(preset, tokenizer):
    model = tiny_model(preset, tokenizer.vocab_size, ctx=32)
    rng = random.Random(1)
    requests = []
    for i in range(10):
        prompt = [rng.randrange(0, 256) for _ in range(rng.randint(1, 14))]
        sampling = SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.9, top_k=20, seed=i)
        requests.append(GenerationRequest(prompt, rng.randint(1, 18), sampling))
    # a cache of exactly one context window forces compactions as rows of different ages mix
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_queue=100, cache_len=32)
    handles = drive(scheduler, requests, rng)
    assert scheduler.stats.max_active == 4 and scheduler.stats.compactions > 0
    for handle, req in zip(handles, requests):
        events = list(handle.events(timeout=5))
        expected = generate_ids(model, [req.prompt_ids], max_new_tokens=req.max_new_tokens,
                                sampling=req.sampling, stop_ids=[tokenizer.eot_id])[0]
        assert "".join(e.text for e in events) == tokenizer.decode(expected)
        assert events[-1].completion_tokens == len(expected)
        assert events[-1].finish_reason == ("length" if len(expected) == req.max_new_tokens else "stop")


def test_stop_strings_end_a_row_and_are_not_shown(tokenizer):
    model = tiny_model("llama-tiny", tokenizer.vocab_size)
    prompt = tokenizer.encode("Hello there")
    full = tokenizer.decode(generate_ids(model, [prompt], max_new_tokens=20, stop_ids=[tokenizer.eot_id])[0])
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    scheduler = Scheduler(model, tokenizer, max_batch=2)
    [handle] = drive(scheduler, [GenerationRequest(prompt, 20, stop=[stop])], random.Random(0))
    events = list(handle.events(timeout=5))
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_queue_is_bounded_and_cancel_frees_the_slot(tokenizer):
    model = tiny_model("llama-tiny", tokenizer.vocab_size)
    scheduler = Scheduler(model, tokenizer, max_batch=1, max_queue=2)
    req = GenerationRequest([5, 6, 7], 30)
    first, second = scheduler.submit(req), scheduler.submit(req)
    with pytest.raises(QueueFull):
        scheduler.submit(req)
    with pytest.raises(QueueFull):  # all-or-nothing for the n choices of one call
        scheduler.submit_many([req, req])
    scheduler._waiting = [second]
    scheduler.iterate([first])
    assert scheduler.active == 1
    first.cancel()
    scheduler.iterate([])
    assert scheduler.active == 0
    scheduler.iterate(scheduler._waiting)
    assert scheduler.active == 1


def test_worker_thread_serves_concurrent_submissions(tokenizer):
    model = tiny_model("gpt2-tiny", tokenizer.vocab_size)
    scheduler = Scheduler(model, tokenizer, max_batch=8).start()
    try:
        prompts = [[i + 1] * (i + 1) for i in range(10)]
        handles = [scheduler.submit(GenerationRequest(p, 12)) for p in prompts]
        events = [list(h.events(timeout=30)) for h in handles]
    finally:
        scheduler.stop()
    expected = generate_ids(model, prompts, max_new_tokens=12, stop_ids=[tokenizer.eot_id])
    assert ["".join(e.text for e in ev) for ev in events] == [tokenizer.decode(ids) for ids in expected]
    tokens = sum(ev[-1].completion_tokens for ev in events)
    assert scheduler.stats.steps < tokens / 2  # rows really were decoded together
