"""`scratchlm tokenizer ...`: the verbs work end to end; bad input is one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import load_tokenizer

def _corpus() -> str:
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 9)))
             for _ in range(3000)]
    return "The quick brown fox jumps over the lazy dog. 😊 Émile's café, 東京.\n" + " ".join(words)


CORPUS = _corpus()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "a.txt").write_text(CORPUS, encoding="utf-8")
    lines = [json.dumps({"body": f"document {i}: {CORPUS[:300]}"}) for i in range(20)]
    (root / "b.jsonl").write_text("\n".join(lines + ["{broken"]) + "\n", encoding="utf-8")
    out = root / "tok"
    rc = main(["tokenizer", "train", "--input", str(root / "a.txt"), "--vocab-size", "400",
               "--out", str(out), "--special", "<|endoftext|>", "<|pad|>"])
    assert rc == 0
    return root, out


def _errors(capsys, argv) -> list[str]:
    assert main(argv) == 2
    # What a terminal shows: a progress bar cleared with \r leaves nothing behind.
    err = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.split("\n")]
    return [line for line in err if line.strip()]


def test_train_writes_a_loadable_tokenizer(trained):
    _, out = trained
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400
    assert tok.special_tokens == {"<|endoftext|>": 398, "<|pad|>": 399}


def test_train_reads_jsonl_fields_and_respects_max_bytes(trained, capsys, tmp_path):
    root, _ = trained
    rc = main(["tokenizer", "train", "--input", str(root / "b.jsonl"), "--text-field", "body",
               "--vocab-size", "300", "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "b.jsonl:21" in captured.err  # the malformed line is reported with file and line
    assert load_tokenizer(tmp_path).vocab_size == 300
    # With --max-bytes the reading stops early, before the malformed line.
    rc = main(["tokenizer", "train", "--input", str(root / "b.jsonl"), "--text-field", "body",
               "--vocab-size", "300", "--out", str(tmp_path), "--max-bytes", "2000"])
    assert rc == 0 and "b.jsonl:21" not in capsys.readouterr().err
    lines = _errors(capsys, ["tokenizer", "train", "--input", str(root / "b.jsonl"), "--strict",
                             "--text-field", "body", "--vocab-size", "300", "--out", str(tmp_path)])
    assert len(lines) == 1 and "b.jsonl:21" in lines[0]


def test_encode_prints_ids_from_argument_and_stdin(trained, capsys, monkeypatch):
    _, out = trained
    tok = load_tokenizer(out)
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "fox\\n😊"]) == 0
    printed = capsys.readouterr().out.split()
    assert list(map(int, printed)) == tok.encode("fox\n😊")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("the lazy dog<|endoftext|>"))
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--allow-special"]) == 0
    assert list(map(int, capsys.readouterr().out.split()))[-1] == tok.eot_id


def test_show_displays_boundaries_and_bytes(trained, capsys, tmp_path):
    _, out = trained
    assert main(["tokenizer", "show", "--tokenizer", str(out), "fox 😊"]) == 0
    shown = capsys.readouterr().out.splitlines()
    ids = load_tokenizer(out).encode("fox 😊")
    assert f"{len(ids)} tokens, 8 bytes" in shown
    rows = [line.split()[0] for line in shown[4:] if line.strip()]
    assert rows == [str(i) for i in ids]  # one row per token, in order, with its id
    # An untrained (bytes-only) tokenizer shows the emoji as four single-byte pieces.
    bare = tmp_path / "bare"
    assert main(["tokenizer", "train", "--input", str(trained[0] / "a.txt"), "--vocab-size", "257",
                 "--out", str(bare)]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "show", "--tokenizer", str(bare), "😊"]) == 0
    shown = capsys.readouterr().out
    assert "|\\xf0|\\x9f|\\x98|\\x8a|" in shown
    for hexbyte in ("f0", "9f", "98", "8a"):
        assert f"  {hexbyte}  " in shown or f" {hexbyte} " in shown


def test_stats_reports_bytes_per_token(trained, capsys):
    root, out = trained
    assert main(["tokenizer", "stats", "--tokenizer", str(out), "--input", str(root / "a.txt")]) == 0
    report = capsys.readouterr().out
    tok = load_tokenizer(out)
    expected = len(CORPUS.encode()) / len(tok.encode(CORPUS))
    assert f"bytes per token  {expected:.3f}" in report
    assert "vocabulary used" in report


@pytest.mark.parametrize("case", ["empty", "vocab", "missing", "broken", "nonutf8-json", "notdir"])
def test_bad_input_is_one_clear_line(trained, capsys, tmp_path, case):
    root, out = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"type": "bpe", "vocab": [1, 2')
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "tokenizer.json").write_bytes(b'{"type": "caf\xe9"}')
    argv = {
        "empty": ["tokenizer", "train", "--input", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "o")],
        "vocab": ["tokenizer", "train", "--input", str(root / "a.txt"), "--vocab-size", "100", "--out", str(tmp_path / "o")],
        "missing": ["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(tmp_path / "o")],
        "broken": ["tokenizer", "encode", "--tokenizer", str(broken), "x"],
        "nonutf8-json": ["tokenizer", "encode", "--tokenizer", str(latin1), "x"],
        "notdir": ["tokenizer", "show", "--tokenizer", str(tmp_path / "nothing"), "x"],
    }[case]
    expect = {"empty": "empty", "vocab": "too small", "missing": "not found", "broken": "not valid JSON",
              "nonutf8-json": "UTF-8", "notdir": "not found"}[case]
    lines = _errors(capsys, argv)
    assert len(lines) == 1, lines
    assert lines[0].startswith("scratchlm: error: ") and expect in lines[0]


def test_non_utf8_training_file_is_replaced_and_counted(capsys, tmp_path):
    # The shared sources contract: invalid UTF-8 never crashes; it is replaced and reported.
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait, na\xefve ".encode("latin-1") * 50)
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300",
                 "--out", str(tmp_path / "o")]) == 0
    assert "invalid UTF-8" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scratchlm", "tokenizer", "encode", "--tokenizer",
                           str(tmp_path / "missing"), "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
