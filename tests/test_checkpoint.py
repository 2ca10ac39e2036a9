"""Checkpoints: exact round trip of weights, optimizer state and RNG; truncated, corrupted or
half-written checkpoints detected and the previous one used (by the manager and by a resumed
training run); only the last K kept; a tied weight stored once and re-tied on load."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_train_support import TINY, corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.config import load_config
from scratchlm.train.checkpoint import (CheckpointManager, capture_rng_state, load_weights,
                                        restore_rng_state, weights_for_saving)
from scratchlm.train.optim import AdamW, Muon, muon_parameter_groups


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 6)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.tok_embeddings.weight  # tied

    def forward(self, idx):
        return self.lm_head(torch.relu(self.proj(self.tok_embeddings(idx))))


def trained(optimizer_cls=AdamW, steps=3, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    if optimizer_cls is Muon:
        opt = Muon(muon_parameter_groups(model, 0.1, lr=1e-2, muon_lr=0.02))
    else:
        opt = optimizer_cls(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 5))
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save_steps(manager, steps, model, opt):
    return [manager.save(s, model, opt, {"tokens": s * 10, "task": {"cursor": s}}) for s in steps]


@pytest.mark.parametrize("optimizer_cls", [AdamW, Muon])
def test_round_trip_is_exact_and_training_continues_identically(tmp_path, optimizer_cls):
    model, opt = trained(optimizer_cls)
    manager = CheckpointManager(tmp_path)
    manager.save(3, model, opt, {"task": {}})
    ckpt = manager.load_latest()
    assert ckpt.step == 3

    model2, opt2 = trained(optimizer_cls, steps=1, seed=1)  # different weights and state
    load_weights(model2, ckpt.model)
    opt2.load_state_dict(ckpt.optimizer)
    assert model2.lm_head.weight is model2.tok_embeddings.weight  # still tied after loading
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # one more identical step on both must give identical weights (moments and counts restored)
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(5)
        idx = torch.randint(0, 11, (4, 5))
        torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_a_tied_weight_is_stored_once():
    model, _ = trained()
    saved = weights_for_saving(model)
    assert "tok_embeddings.weight" in saved and "lm_head.weight" not in saved


def test_rng_states_restore_exactly():
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(1), np.random.seed(2)
    restore_rng_state(json.loads(json.dumps(state)))  # through JSON, as in state.json
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda d: _truncate(d / "model.safetensors"), "model.safetensors fails its checksum"),
    (lambda d: _flip_a_byte(d / "optimizer.safetensors"), "optimizer.safetensors fails its checksum"),
    (lambda d: (d / "state.json").unlink(), "no state.json"),
    (lambda d: _truncate(d / "state.json"), "state.json is not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
])
def test_a_damaged_latest_checkpoint_is_detected_and_the_previous_used(tmp_path, damage, reason):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, [2, 4], model, opt)
    damage(tmp_path / "step_00000004")
    warnings = []
    assert manager.latest_valid(warn=warnings.append) == tmp_path / "step_00000002"
    assert len(warnings) == 1 and reason in warnings[0]
    assert manager.load_latest(warn=lambda m: None).state["task"] == {"cursor": 2}


def test_only_the_last_k_are_kept_and_leftovers_removed(tmp_path):
    model, opt = trained()
    leftover = tmp_path / ".step_00000001.tmp-999999999"  # from a process that no longer exists
    leftover.mkdir()
    manager = CheckpointManager(tmp_path, keep=2)
    save_steps(manager, [1, 2, 3, 4], model, opt)
    assert [s for s, _ in manager.list_steps()] == [3, 4]
    assert not leftover.exists()
    assert manager.latest_valid() == tmp_path / "step_00000004"


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path)
    manager.save(5, model, opt, {"task": {"v": 1}})
    manager.save(5, model, opt, {"task": {"v": 2}})
    assert manager.load_latest().state["task"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]


def test_a_run_resumes_from_the_last_good_checkpoint(tmp_path):
    from scratchlm.train.pretrain import pretrain

    texts = corpus_texts(60_000)
    data = make_dataset(tmp_path / "ds", train_tokenizer(texts, 280), texts, val_docs=1)
    sets = [*TINY, "model.preset=gpt2-tiny", "train.eval_every=0", "train.ckpt_every=2"]
    with one_thread():
        pretrain(data, tmp_path / "run", load_config(None, [*sets, "train.max_steps=4"]))
        _truncate(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors")
        result = pretrain(data, tmp_path / "run", load_config(None, [*sets, "train.max_steps=6"]))
    assert result.resumed_from == 2 and result.step == 6
