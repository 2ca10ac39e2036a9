"""Pretraining end to end on tiny models: presets learn, runs resume bit for bit after kill -9 and
SIGTERM, datasets from another tokenizer are refused, NaN losses are skipped then stop the run,
gradient accumulation and activation checkpointing do not change the update, outputs exist."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import (TINY, corpus_texts, make_dataset, one_thread, train_tokenizer,
                                unigram_entropy)

from scratchlm.config import Config, load_config
from scratchlm.errors import UserError
from scratchlm.train.pretrain import pretrain, token_byte_lengths
from scratchlm.train.trainer import TrainingDiverged, train


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts(), 300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):
    return make_dataset(tmp_path_factory.mktemp("ds"), tokenizer, corpus_texts())


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def run(dataset, out, *sets, **kwargs):
    return pretrain(dataset, out, load_config(None, [*TINY, *sets]), **kwargs)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("preset, optimizer, lr, steps", [
    ("gpt2-tiny", "muon", "1e-2", 60),
    ("vaswani-tiny", "muon", "1e-2", 60),
    ("llama-tiny", "adamw", "3e-3", 60),
])
def test_each_preset_learns_well_below_unigram_entropy(dataset, tmp_path, preset, optimizer, lr, steps):
    result = run(dataset, tmp_path / "run", f"model.preset={preset}", f"train.optimizer={optimizer}",
                 f"train.lr={lr}", f"train.max_steps={steps}", "train.micro_batch_size=16",
                 "train.eval_every=0", "train.ckpt_every=0")
    entropy = unigram_entropy(dataset)
    # a model that ignored context could at best reach the unigram entropy; 0.3 nats below it
    # means it uses the previous tokens
    assert result.last_eval["val_loss"] < entropy - 0.3, (result.last_eval, entropy)
    assert result.last_loss < entropy - 0.3


# ---------------------------------------------------------------------------------------------
# Outputs


def test_run_dir_has_every_output(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "model.preset=gpt2-tiny", "train.max_steps=10", "train.eval_every=5",
        "train.ckpt_every=5", "train.log_every=2")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 300 and config["model"]["n_layer"] == 2
    assert config["train"]["max_steps"] == 10 and config["data"]["path"] == str(dataset)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    for r in records:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_s"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 32
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10] and all(r["val_bpb"] > 0 for r in evals)
    # the run's weights are the last checkpoint's, and a tied matrix is stored once
    final = weights(out / "model.safetensors")
    assert "lm_head.weight" not in final and "tok_embeddings.weight" in final
    ckpt = weights(out / "checkpoints" / "step_00000010" / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_load_run_gives_back_the_trained_model(dataset, tmp_path, tokenizer):
    from scratchlm.runs import load_run

    out = tmp_path / "run"
    run(dataset, out, "model.preset=llama-tiny", "train.max_steps=3", "train.eval_every=0")
    loaded = load_run(out)
    saved = weights(out / "model.safetensors")
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint
    assert loaded.tokenizer.vocab_size == 300 and loaded.config["train"]["max_steps"] == 3


def test_token_byte_lengths_add_up_to_the_decoded_text(tokenizer):
    text = "def f(x):\n    return x * 2  # ünïcode"
    ids = tokenizer.encode(text)
    lengths = token_byte_lengths(tokenizer, tokenizer.vocab_size + 4)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.eot_id] == 0 and lengths[-4:].sum() == 0  # specials, padding: no text


# ---------------------------------------------------------------------------------------------
# Resume


def _start(dataset, out, sets):
    cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--data", str(dataset), "--out", str(out),
           "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigterm_then_kill9_resume_is_bitwise_identical(dataset, tmp_path):
    # dropout on, so the RNG state must be restored too
    sets = [*TINY, "model.preset=gpt2-tiny", "model.dropout=0.1", "train.max_steps=40",
            "train.ckpt_every=2", "train.eval_every=10", "train.keep_checkpoints=2"]
    reference = tmp_path / "reference"
    pretrain(dataset, reference, load_config(None, sets))

    out = tmp_path / "interrupted"
    ckpts = out / "checkpoints"
    proc = _start(dataset, out, sets)
    _wait_for(ckpts / "step_00000004", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err
    stopped_at = max(int(p.name[5:]) for p in ckpts.glob("step_*"))
    assert stopped_at < 40

    proc = _start(dataset, out, sets)
    _wait_for(ckpts / f"step_{(stopped_at // 2 + 2) * 2:08d}", proc)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.communicate(timeout=60)
    assert not (ckpts / "step_00000040").exists(), "the run finished before it could be killed"

    proc = _start(dataset, out, sets)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming from" in err
    a, b = weights(reference / "model.safetensors"), weights(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    # metrics read as one run: each step once
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_resuming_with_another_model_is_refused(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "model.preset=gpt2-tiny", "train.max_steps=2")
    with pytest.raises(UserError, match="different model.*model.n_layer"):
        run(dataset, out, "model.preset=gpt2-tiny", "model.n_layer=3", "train.max_steps=4")


def test_dataset_from_another_tokenizer_is_refused(dataset, tmp_path):
    other = train_tokenizer(corpus_texts(50_000, skip=3), 280)
    other.save(tmp_path / "other_tok")
    with pytest.raises(UserError, match="tokenized with"):
        run(dataset, tmp_path / "run", "train.max_steps=1", tokenizer_dir=tmp_path / "other_tok")


# ---------------------------------------------------------------------------------------------
# The loop's mechanics


def test_grad_accumulation_equals_one_big_batch(dataset, tmp_path):
    common = ["model.preset=llama-tiny", "train.max_steps=2", "train.eval_every=0", "train.grad_clip=0"]
    run(dataset, tmp_path / "big", *common, "train.micro_batch_size=8")
    run(dataset, tmp_path / "accum", *common, "train.micro_batch_size=2", f"train.batch_tokens={8 * 32}")
    a, b = weights(tmp_path / "big" / "model.safetensors"), weights(tmp_path / "accum" / "model.safetensors")
    moved = weights(tmp_path / "big" / "checkpoints" / "step_00000002" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6)
    assert all(torch.equal(a[k], moved[k]) for k in a)


def test_activation_checkpointing_does_not_change_training(dataset, tmp_path):
    common = ["model.preset=gpt2-tiny", "train.max_steps=2", "train.eval_every=0"]
    run(dataset, tmp_path / "plain", *common)
    run(dataset, tmp_path / "ckpt", *common, "train.activation_checkpointing=true")
    a, b = weights(tmp_path / "plain" / "model.safetensors"), weights(tmp_path / "ckpt" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_time_budget_stops_the_run(dataset, tmp_path):
    result = run(dataset, tmp_path / "run", "model.preset=gpt2-tiny", "train.max_steps=1000000",
                 "train.max_minutes=0.0001", "train.eval_every=0")
    assert result.stopped == "max_minutes" and result.step < 1000000
    assert (tmp_path / "run" / "model.safetensors").is_file()


class ToyTask:
    """A linear model's squared output; batches listed in `nan_batches` give a NaN loss."""

    def __init__(self, nan_batches=()):
        self.batches = 0
        self.nan_batches = set(nan_batches)

    def next_batch(self):
        self.batches += 1
        return self.batches

    def loss(self, model, batch):
        loss = model(torch.ones(4, 3)).pow(2).mean()
        if batch in self.nan_batches:
            loss = loss * float("nan")
        return loss, {}, 4

    def evaluate(self, model):
        return {"val_loss": 0.0}

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def toy_config(**train):
    config = Config()
    for key, value in {"max_steps": 6, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
                       "progress": False, "tensorboard": False, "dtype": "fp32", "warmup_steps": 0,
                       "lr": 0.1, **train}.items():
        setattr(config.train, key, value)
    return config


def test_a_nan_loss_skips_the_step(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    logged = []
    result = train(toy_config(), model, ToyTask(nan_batches={3}), tmp_path, on_step=logged.append)
    assert result.step == 6 and math.isfinite(result.last_loss)
    assert [r["step"] for r in logged] == [1, 2, 4, 5, 6]
    assert "not finite" in capsys.readouterr().err
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["optimizer"]["state"]["0"]["step"] == 5  # one update skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_losses_in_a_row_stop_the_run(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TrainingDiverged, match="NaN/Inf for 3 steps in a row"):
        train(toy_config(max_bad_steps=3), model, ToyTask(nan_batches={2, 3, 4}), tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_every_precision_trains(tmp_path, dtype):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.zero_()  # loss 9 at the start
    logged = []
    train(toy_config(dtype=dtype, max_steps=8), model, ToyTask(), tmp_path, on_step=logged.append)
    assert logged[-1]["loss"] < logged[0]["loss"] / 2
