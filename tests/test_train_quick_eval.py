"""Benchmark tasks scored during pretraining: `eval.tasks_dir` puts their accuracies in
metrics.jsonl at every evaluation, and they equal what `scratchlm.eval` gives the saved model."""

from __future__ import annotations

import json

import pytest
from test_train_support import TINY, corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.config import load_config
from scratchlm.eval.tasks import quick_eval
from scratchlm.runs import load_run
from scratchlm.train.pretrain import pretrain


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_eval_tasks_are_logged_at_each_evaluation(tmp_path, eval_dir):
    tokenizer = train_tokenizer(corpus_texts(60_000), 300)
    data = make_dataset(tmp_path / "ds", tokenizer, corpus_texts(60_000))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    # two task types from the shared fixtures, as a suite without tasks.json (zero-shot)
    for name in ("piqa_small.jsonl", "lambada_small.jsonl"):
        (tasks_dir / name).write_bytes((eval_dir / "small" / name).read_bytes())
    out = tmp_path / "run"
    pretrain(data, out, load_config(None, [*TINY, "model.preset=gpt2-tiny", "train.max_steps=4",
                                           "train.eval_every=2", f"eval.tasks_dir={tasks_dir}",
                                           "eval.limit=5"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"eval/piqa_small", "eval/lambada_small", "eval/suite_score"} <= set(r)
    run = load_run(out)
    expected = quick_eval(run.model, run.tokenizer, tasks_dir, limit=5)
    assert {k: evals[-1][k] for k in expected} == pytest.approx(expected)
