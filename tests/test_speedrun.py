"""`scratchlm speedrun` end to end on a tiny budget: every artifact, every report section, skip and resume."""

from __future__ import annotations

import ast
import json
import os
import textwrap

from pathlib import Path

import pytest

from scratchlm import speedrun as sr
from scratchlm.errors import UserError
from scratchlm.files import atomic_write_json, read_json

SECTIONS = ("Summary", "Configuration", "Environment", "Time and tokens per stage", "Training curves",
            "Tokenizer", "Data", "Evaluation", "Docstring to Python", "Samples", "Quantization", "Use it")


SMALL_TASKS = Path(os.environ.get("SCRATCHLM_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "eval" / "small"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    sr.speedrun(out, minutes=0.5, progress=False, tasks_dir=SMALL_TASKS if SMALL_TASKS.is_dir() else None)
    return out


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}


def test_every_artifact_is_there(run_dir):
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (run_dir / "data" / "index.json").is_file()
    for name in ("base", "sft", "dpo", "quant/int8", "quant/int4"):
        assert (run_dir / name / "model.safetensors").is_file(), name
        assert (run_dir / name / "config.json").is_file(), name
    for name in ("unigram", "base", "sft", "dpo"):
        assert (run_dir / "eval" / f"{name}.json").is_file()
    for png in ("base_loss", "base_lr", "sft_loss", "dpo_loss"):
        assert (run_dir / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    state = read_json(run_dir / sr.STATE_FILE)
    assert [state["stages"][s]["status"] for s in sr.STAGES] == ["done"] * len(sr.STAGES)
    assert state["stages"]["pretrain"]["tokens"] > 0 and state["stages"]["sft"]["steps"] > 0
    # the quantized runs load and are smaller than the float one
    rows = {r["format"]: r for r in read_json(run_dir / "quant" / "quant.json")["rows"]}
    assert rows["int4"]["file_bytes"] < rows["int8"]["file_bytes"] < rows["fp32"]["file_bytes"]
    for fmt, row in rows.items():
        assert row["file_bytes"] == os.path.getsize(os.path.join(row["path"], "model.safetensors")), fmt


def test_report_has_every_section_in_both_formats(run_dir):
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    for title in SECTIONS:
        assert f"## {title}" in md, title
        assert f">{title}</h2>" in page, title
    for png in ("plots/base_loss.png", "plots/base_lr.png", "plots/sft_loss.png", "plots/dpo_loss.png"):
        assert png in md and png in page
    assert '<div class="tokens"><span style="background:' in page  # the coloured tokenization sample
    assert f"scratchlm chat --model {run_dir / 'dpo'}" in md
    if SMALL_TASKS.is_dir():  # --tasks-dir given: the benchmark table, one row per task
        suite = read_json(run_dir / "eval" / "dpo.json")["suite"]
        assert suite["tasks"] and "benchmark suite (--tasks-dir)" in md
        for label in suite["tasks"]:
            assert f"| {label} |" in md


def test_report_figures_come_from_the_run_files(run_dir):
    """Change a figure in a run file and the rebuilt report shows the new value."""
    path = run_dir / "eval" / "base.json"
    original = path.read_bytes()
    try:
        data = json.loads(original)
        data["val_bpb"]["bpb"] = 7.654321
        data["docstring"].update(parsed=3, prompts=7, parse_rate=3 / 7)
        atomic_write_json(path, data)
        md = sr.build_report(run_dir, read_json(run_dir / sr.STATE_FILE)).to_markdown()
        assert "| base model val bpb | 7.654 |" in md
        assert "| base model: docstring -> Python that parses | 3/7 (43%); ended by the model" in md
    finally:
        path.write_bytes(original)
    state = read_json(run_dir / sr.STATE_FILE)
    md = (run_dir / "report.md").read_text()
    tokens = state["stages"]["pretrain"]["tokens"]
    assert f"| pretraining tokens | {tokens:,} |" in md


def test_unigram_baseline_matches_a_direct_count(run_dir):
    import math
    from collections import Counter

    import numpy as np

    from scratchlm.data.shards import Dataset
    from scratchlm.tokenizer import load_tokenizer

    dataset = Dataset.open(run_dir / "data")
    tok = load_tokenizer(run_dir / "tokenizer")
    specials = set(tok.special_tokens.values())
    values, freq = np.unique(np.asarray(dataset.tokens("train")), return_counts=True)
    counts = Counter({int(v): int(c) for v, c in zip(values, freq) if int(v) not in specials})
    text_ids = [i for i in range(tok.vocab_size) if i not in specials]
    total = sum(counts.values()) + len(text_ids)
    docs = sr.eval_documents(dataset, sr.QUICK_SCALE.eval_tokens)
    ids = [t for d in docs for t in d]
    bits = -sum(math.log2((counts[t] + 1) / total) for t in ids)
    n_bytes = sum(len(tok.token_bytes(t)) for t in ids)
    saved = read_json(run_dir / "eval" / "unigram.json")
    assert saved["bpb"] == pytest.approx(bits / n_bytes, rel=1e-9)
    assert saved["tokens"] == len(ids) == sr.QUICK_SCALE.eval_tokens


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(run_dir):
    state = read_json(run_dir / sr.STATE_FILE)
    before = _mtimes(run_dir)
    # pretend quantization was killed half way: its outputs gone, its status "running"
    state["stages"]["quantize"]["status"] = "running"
    atomic_write_json(run_dir / sr.STATE_FILE, state)
    for p in (run_dir / "quant").rglob("*"):
        if p.is_file():
            p.unlink()
    sr.speedrun(run_dir, minutes=0.5, progress=False)
    after_state = read_json(run_dir / sr.STATE_FILE)
    after = _mtimes(run_dir)
    for stage in ("tokenizer", "data", "pretrain", "sft", "dpo", "eval"):  # untouched
        assert after_state["stages"][stage] == state["stages"][stage], stage
    for p, mtime in before.items():
        if "quant" not in p.parts:
            assert after[p] == mtime, p
    assert after_state["stages"]["quantize"]["status"] == "done"
    assert after_state["stages"]["quantize"]["seconds"] > state["stages"]["quantize"]["seconds"]
    assert (run_dir / "quant" / "int4" / "model.safetensors").is_file()
    assert (run_dir / "quant" / "quant.json").is_file()


def test_other_settings_in_the_same_out_are_refused(run_dir):
    with pytest.raises(UserError, match="other settings"):
        sr.Speedrun(sr.SpeedrunOptions(out=str(run_dir), data=["some.jsonl"], progress=False))


def test_cli_rejects_a_bad_budget_in_one_line(tmp_path, capsys):
    from scratchlm.cli import main

    assert main(["speedrun", "--out", str(tmp_path / "r"), "--minutes", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--minutes" in err[0]


def test_body_parses_accepts_real_bodies_and_rejects_broken_ones():
    from scratchlm.posttrain.defaults import _break_syntax, stdlib_functions

    examples = stdlib_functions(8)[:40]
    assert examples
    import random

    for ex in examples:
        assert sr.body_parses(ex.body), ex.qualname
        assert sr.body_parses(textwrap.indent(ex.body, "    ")), ex.qualname  # as a base model writes it
        broken = _break_syntax(ex.body, random.Random(0))
        if broken is not None:
            assert not sr.body_parses(broken), ex.qualname
    assert not sr.body_parses("   \n\n")


def test_base_answer_stops_where_the_function_ends():
    text = "    x = 1\n    return x\n\n\ndef other():\n    pass\n"
    assert sr.base_answer(text, hit_length=False) == "    x = 1\n    return x\n\n"
    # a continuation cut by the token limit loses its last, partial line
    assert sr.base_answer("    x = 1\n    return fo", hit_length=True) == "    x = 1"
    assert sr.body_parses(sr.base_answer(text, False))
    assert sr.base_function_ended(text) and not sr.base_function_ended("    x = 1\n    y = 2")
    ast.parse("def f():\n" + sr.base_answer(text, False))


def test_a_faster_machine_or_a_longer_budget_gets_a_bigger_model(run_dir, monkeypatch):
    """The model is sized by measured throughput: more FLOP/s or more seconds never pick a smaller one."""
    from scratchlm.model.accounting import flops_per_token

    run = sr.Speedrun(sr.SpeedrunOptions(out=str(run_dir), minutes=0.5, progress=False))
    rate = {"flops": 0.0}
    monkeypatch.setattr(sr, "measure_throughput",
                        lambda cfg, micro, seq_len, *a, **k: rate["flops"] / flops_per_token(cfg, seq_len))
    sizes = []
    for flops, seconds in ((1e9, 60), (1e11, 60), (1e11, 600), (1e13, 600), (1e15, 3600)):
        rate["flops"] = flops
        plan = run.plan_pretrain(seconds)
        sizes.append(plan["params"])
        assert plan["max_steps"] * plan["batch_tokens"] <= plan["estimated_tokens_per_sec"] * seconds
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


def test_a_training_stage_stopped_by_a_signal_is_not_marked_done():
    from scratchlm.train.trainer import TrainResult

    with pytest.raises(KeyboardInterrupt):
        sr.finished(TrainResult(step=3, tokens=10, stopped="signal"), "pretrain")
    assert sr.finished(TrainResult(step=3, tokens=10, stopped="max_minutes"), "sft")["steps"] == 3
