"""`scratchlm data prepare|stats|sample`: the verbs run the library and print what they should."""

from __future__ import annotations

import json

import pytest

from scratchlm.cli import main


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpora_dir):
    from scratchlm.tokenizer import BPETokenizer

    text = json.loads((corpora_dir / "austen.jsonl").open().readline())["text"][:40_000]
    out = tmp_path_factory.mktemp("tok")
    BPETokenizer.train([text], 300, progress=False, workers=1).save(out)
    return out


@pytest.fixture(scope="module")
def plays(tmp_path_factory, corpora_dir):
    """Eight plays (~0.8 MB): enough for shards and a validation split, quick to tokenize."""
    path = tmp_path_factory.mktemp("plays") / "plays.jsonl"
    lines = (corpora_dir / "shakespeare.jsonl").read_text().splitlines()[:8]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tokenizer_dir, plays):
    out = tmp_path_factory.mktemp("data") / "ds"
    code = main(["data", "prepare", "--input", str(plays),
                 "--tokenizer", str(tokenizer_dir), "--out", str(out), "--workers", "2",
                 "--val-fraction", "0.3", "--dedup", "minhash", "--shard-tokens", "200000"])
    assert code == 0
    return out


def test_prepare_prints_a_summary(dataset_dir, capsys, tokenizer_dir, plays):
    # an identical re-run returns the complete dataset and prints the same summary
    code = main(["data", "prepare", "--input", str(plays),
                 "--tokenizer", str(tokenizer_dir), "--out", str(dataset_dir), "--workers", "2",
                 "--val-fraction", "0.3", "--dedup", "minhash", "--shard-tokens", "200000"])
    out = capsys.readouterr().out
    assert code == 0
    assert "read" in out and "kept" in out and "tokens" in out and str(dataset_dir) in out


def test_stats_prints_json(dataset_dir, capsys):
    assert main(["data", "stats", str(dataset_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    index = json.loads((dataset_dir / "index.json").read_text())
    assert stats["tokens"] == sum(s["tokens"] for s in index["shards"]) > 0
    assert stats["docs"] == stats["stats"]["kept"]["docs"]
    assert stats["splits"]["val"]["docs"] > 0
    assert stats["sources"][0]["docs_kept"] == stats["docs"]
    assert "dedup" in stats["stats"] and "filters" in stats["stats"]


def test_sample_decodes_windows(dataset_dir, capsys, plays):
    assert main(["data", "sample", str(dataset_dir), "-n", "2", "--seq-len", "40"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.count("--- window") == 2
    plays = plays.read_text()
    pieces = [p.split("\n", 1)[1] for p in out.split("--- window")[1:]]
    for piece in pieces:
        words = piece.split()[1:-1]  # the ends may be cut mid-word
        assert " ".join(words[:3]) and all(w in plays for w in words)


def test_bad_input_is_one_line_and_exit_2(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["data", "prepare", "--input", str(tmp_path / "empty"), "--tokenizer",
                 str(tokenizer_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no readable" in err and "Traceback" not in err
    assert main(["data", "stats", str(tmp_path / "empty")]) == 2
    assert "not a complete dataset" in capsys.readouterr().err
