"""Quantized run dirs end to end: `scratchlm quantize` -> `scratchlm.load` -> generate / eval.

A quantized run must load through the ordinary `runs.load_run` (the config's `quantization`
section rebuilds the modules), compute exactly what the in-memory quantized model computed,
stay close to the float model, generate text, and be several times smaller on disk.
"""

from __future__ import annotations

import random

import pytest
import torch

import scratchlm
from scratchlm.cli import main as cli_main
from scratchlm.errors import UserError
from scratchlm.model.quant import QuantLinear, model_nbytes, quantize_model, quantize_run
from scratchlm.runs import load_run

from server_helpers import make_run


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    # llama (untied head) and gpt2 (tied) shapes; d_model 64 so INT4 groups of 32/64 fit
    base = tmp_path_factory.mktemp("qrun")
    return {preset: make_run(base / preset, preset=preset) for preset in ("llama-tiny", "gpt2-tiny")}


@pytest.fixture(scope="module")
def calibration_dataset(tmp_path_factory, float_run):
    from scratchlm.data.shards import write_dataset

    tok = load_run(float_run["llama-tiny"]).tokenizer
    rng = random.Random(0)
    texts = ["Hello there! How are you today?", "Once upon a time there was a model.", "User: hi\nAssistant: hello"]
    docs = [tok.encode(" ".join(rng.choice(texts) for _ in range(20))) for _ in range(12)]
    out = tmp_path_factory.mktemp("calib") / "data"
    write_dataset(out, {"train": docs[:10], "val": docs[10:]}, vocab_size=tok.vocab_size, eot_id=tok.eot_id,
                  tokenizer_sha256=tok.fingerprint)
    return out


@pytest.mark.parametrize("preset,bits", [("llama-tiny", 4), ("gpt2-tiny", 8)])  # untied / tied head
def test_quantized_run_reloads_exactly_and_generates(float_run, tmp_path, preset, bits):
    src = float_run[preset]
    report = quantize_run(src, tmp_path / "q", bits=bits, group_size=32, progress=False)
    in_memory = load_run(src).model
    quantize_model(in_memory, bits=bits, group_size=32, progress=False)
    loaded = load_run(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert loaded.config["quantization"]["bits"] == bits
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(idx), in_memory(idx))
        ref = load_run(src).model(idx)
        rel = ((loaded.model(idx) - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if bits == 8 else 0.25)
    assert report.file_ratio > (3.0 if bits == 8 else 4.0)  # tiny models: norms/scales weigh more
    assert report.memory_bytes < report.source_memory_bytes

    lm = scratchlm.load(tmp_path / "q")
    text = lm.generate("Hello there", max_new_tokens=8, temperature=0.7, seed=1, ignore_eos=True)
    assert isinstance(text, str) and lm.complete("Hello", max_new_tokens=8, ignore_eos=True)[0].completion_tokens == 8
    # bf16 activations work too (scales keep their storage dtype)
    bf16 = scratchlm.load(tmp_path / "q", dtype="bf16")
    assert bf16.complete("Hello", max_new_tokens=4, ignore_eos=True)[0].completion_tokens == 4


def test_cli_gptq_with_calibration_dataset_beats_rtn(float_run, calibration_dataset, tmp_path, capsys):
    src = float_run["llama-tiny"]
    common = ["--model", str(src), "--bits", "4", "--group-size", "32", "--embed-bits", "none"]
    assert cli_main(["quantize", *common, "--out", str(tmp_path / "rtn")]) == 0
    assert cli_main(["quantize", *common, "--method", "gptq", "--calibration", str(calibration_dataset),
                     "--calibration-windows", "16", "--calibration-seq-len", "64", "--out", str(tmp_path / "gptq")]) == 0
    assert "smaller" in capsys.readouterr().err
    from scratchlm.data.loader import TokenLoader

    x, _ = TokenLoader(calibration_dataset, split="train", seq_len=64, batch_size=16, seed=0).next_batch()[:2]
    with torch.no_grad():
        ref = load_run(src).model(x)
        err = {m: ((load_run(tmp_path / m).model(x) - ref) ** 2).mean().item() for m in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"]


def test_quantize_errors_are_one_line_user_errors(float_run, tmp_path, capsys):
    src = float_run["llama-tiny"]
    assert cli_main(["quantize", "--model", str(src), "--bits", "4", "--group-size", "7", "--out", str(tmp_path / "x")]) == 2
    assert "--group-size" in capsys.readouterr().err
    assert cli_main(["quantize", "--model", str(src), "--method", "gptq", "--out", str(tmp_path / "y")]) == 2
    assert "--calibration" in capsys.readouterr().err
    quantize_run(src, tmp_path / "q8", bits=8, progress=False)
    with pytest.raises(UserError, match="already quantized"):
        quantize_run(tmp_path / "q8", tmp_path / "again", bits=4, progress=False)


def test_memory_accounting_counts_shared_tensors_once():
    lin = torch.nn.Linear(4, 4)
    m = torch.nn.Sequential(lin, lin)
    assert model_nbytes(m) == (16 + 4) * 4


@pytest.mark.parametrize("preset,method", [("gpt2-tiny", "gptq"), ("llama-tiny", "awq")])
def test_cli_calibrated_and_tuned_run_reloads_and_generates(float_run, calibration_dataset, tmp_path, preset, method):
    src = float_run[preset]  # gpt2-tiny is tied: GPTQ quantizes the shared matrix as the head
    assert cli_main(["quantize", "--model", str(src), "--bits", "4", "--group-size", "32", "--method", method,
                     "--calibration", str(calibration_dataset), "--calibration-windows", "8",
                     "--calibration-seq-len", "32", "--tune-steps", "3", "--out", str(tmp_path / "q")]) == 0
    run = load_run(tmp_path / "q")
    section = run.config["quantization"]
    assert section["method"] == method and section["tune_steps"] == 3
    if preset == "gpt2-tiny":
        assert section["modules"]["lm_head"] == {"tied_to": "tok_embeddings"}
    lm = scratchlm.load(tmp_path / "q")
    assert lm.complete("Hello", max_new_tokens=6, ignore_eos=True)[0].completion_tokens == 6


def test_tuning_needs_a_calibration_dataset(float_run, tmp_path, capsys):
    src = float_run["llama-tiny"]
    assert cli_main(["quantize", "--model", str(src), "--bits", "4", "--tune-steps", "2", "--out", str(tmp_path / "t")]) == 2
    assert "--tune-steps" in capsys.readouterr().err
