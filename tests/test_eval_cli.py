"""`scratchlm eval` end to end on a tiny run: the results JSON has the documented shape; bad input
is one clear line and exit status 2."""

from __future__ import annotations

import json

import pytest

from scratchlm.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    transformer = pytest.importorskip("scratchlm.model.transformer")
    from scratchlm.model.config import ModelConfig
    from scratchlm.runs import save_run
    from scratchlm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["The trophy doesn't fit into the brown suitcase. " * 3, "how do you shake it?"],
                             vocab_size=280, progress=False)
    model = transformer.Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=64))
    run = tmp_path_factory.mktemp("run")
    save_run(run, model, tok, {})
    return run


def test_eval_writes_documented_json(tmp_path, tiny_run, eval_dir, capsys):
    small = eval_dir / "small"
    tasks = [
        {"label": "piqa", "file": str(small / "piqa_small.jsonl"), "type": "multiple_choice", "random_baseline": 0.5},
        {"label": "wino", "file": str(small / "winograd_small.jsonl"), "type": "schema", "random_baseline": 0.5},
    ]
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    (tmp_path / "held_out.txt").write_text("A short held-out text to score. " * 5)
    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(tiny_run), "--tasks-dir", str(tmp_path / "suite"), "--limit", "2",
                 "--bpb", str(tmp_path / "held_out.txt"), "--out", str(out), "--quiet"])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"piqa", "wino"}
    piqa = results["tasks"]["piqa"]
    assert {"accuracy", "accuracy_norm", "centered", "n", "seconds"} <= set(piqa) and piqa["n"] == 2
    assert "accuracy_norm" not in results["tasks"]["wino"]
    centered = [r["centered"] for r in results["tasks"].values()]
    assert results["suite_score"] == pytest.approx(sum(centered) / 2)
    assert results["bpb"] > 0 and results["bpb_detail"]["bytes"] == len("A short held-out text to score. " * 5)
    table = capsys.readouterr().out
    assert "piqa" in table and "suite score" in table and "bits per byte" in table


def test_eval_bad_task_file_is_one_line(tmp_path, tiny_run, capsys):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"label": "t", "file": "t.jsonl", "type": "multiple_choice"}]}))
    (tmp_path / "t.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    code = main(["eval", "--model", str(tiny_run), "--tasks-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "t.jsonl:1: gold 5 is out of range for 2 choices" in err[0]
    assert main(["eval", "--model", str(tiny_run)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
