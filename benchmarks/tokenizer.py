"""Tokenizer benchmark: scratchlm's BPE against HF `tokenizers` and `tiktoken`, side by side.

Builds (once, cached under .bench/) a corpus of about --mb MB from text every machine has: the
Python standard library's source, /usr/share/doc text files and /usr/share/man pages (gzip
decompressed), taken round-robin so no one kind dominates. Then, on that corpus and on the
shared corpora (../shared/corpora, when present), it measures in separate child processes
(so peak memory is each contender's own):

  train    wall time to --vocab ids: scratchlm BPETokenizer.train vs HF BpeTrainer (same split
           pattern, byte-level alphabet, same special token); peak RSS
  encode   throughput in MB/s: one process (scratchlm encode, HF encode, tiktoken encode_ordinary
           of our exported ranks) and all cores (scratchlm encode_batch, HF encode_batch,
           tiktoken encode_ordinary_batch); ids compared between scratchlm and its exports
  ratio    bytes per token of scratchlm's tokenizer vs HF's, both trained on the same text

and prints the ratios against the targets of issue 2. Not a test: timings are noisy on a
shared machine, run it twice. Usage: python benchmarks/tokenizer.py [--mb 50] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
SHARED_CORPORA = Path(os.environ.get("SCRATCHLM_SHARED", REPO.parent / "shared")) / "corpora"
EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- corpus


def _doc_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _read_text(path: Path) -> str | None:
    """The file as text (gunzipped if needed), or None for binaries and unreadable files."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build_corpus(mb: float) -> Path:
    """A JSONL corpus of about `mb` MB (one document per file), cached under .bench/."""
    out = BENCH_DIR / f"tokenizer-corpus-{mb:g}MB.jsonl"
    if out.exists():
        return out
    sys.path.insert(0, str(REPO / "src"))
    from scratchlm.data.builtin import python_stdlib_files

    kinds = [python_stdlib_files(), _doc_files(Path("/usr/share/doc")), _doc_files(Path("/usr/share/man"))]
    budget, size = int(mb * 1e6), 0
    BENCH_DIR.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        iters = [iter(k) for k in kinds]
        while iters and size < budget:
            for it in list(iters):
                path = next(it, None)
                if path is None:
                    iters.remove(it)
                    continue
                text = _read_text(path)
                if text:
                    f.write(json.dumps({"id": str(path), "text": text}, ensure_ascii=False) + "\n")
                    size += len(text.encode("utf-8"))
    tmp.rename(out)
    return out


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def corpus_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# ----------------------------------------------------------------------------- phases (child)


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024  # ru_maxrss is in KiB on Linux


def phase_train_scratchlm(corpus: list[Path], vocab: int, out: Path) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from scratchlm.tokenizer import BPETokenizer
    from scratchlm.tokenizer.merging import have_extension

    def texts():
        for path in corpus:
            yield from read_texts(path)

    start = time.perf_counter()
    tok = BPETokenizer.train(texts(), vocab, pattern="gpt4", special_tokens=[EOT], progress=False)
    seconds = time.perf_counter() - start
    tok.save(out)
    return {"seconds": seconds, "peak_mb": _peak_mb(), "extension": have_extension()}


def phase_train_hf(corpus: list[Path], vocab: int, out: Path) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(REPO / "src"))
    from scratchlm.tokenizer.patterns import GPT4_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        for path in corpus:
            yield from read_texts(path)

    start = time.perf_counter()
    tok.train_from_iterator(texts(), trainer=trainer)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "hf-tokenizer.json"))
    return {"seconds": seconds, "peak_mb": _peak_mb()}


def _groups(texts: list[str], chars: int = 8_000_000) -> list[list[str]]:
    """Consecutive groups of about `chars` characters (keeps batch results small in memory)."""
    groups, current, size = [], [], 0
    for t in texts:
        current.append(t)
        size += len(t)
        if size >= chars:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


def _mb_per_s(n_bytes: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n_bytes / (time.perf_counter() - start) / 1e6


def phase_encode(corpus: list[Path], tok_dir: Path, hf_dir: Path) -> dict:
    """Throughput of each contender (results discarded as they come), then id checks."""
    sys.path.insert(0, str(REPO / "src"))
    from tokenizers import Tokenizer

    from scratchlm.tokenizer import BPETokenizer

    texts = [t for path in corpus for t in read_texts(path)]
    groups = _groups(texts)
    n_bytes = corpus_bytes(texts)
    cores = len(os.sched_getaffinity(0))
    ours = BPETokenizer.load(tok_dir)  # a fresh instance: its chunk cache starts empty
    tik = ours.to_tiktoken()
    hf = Tokenizer.from_file(str(hf_dir / "hf-tokenizer.json"))
    res = {"bytes": n_bytes, "cores": cores}

    def each(fn):
        def run():
            for t in texts:
                fn(t)
        return run

    res["scratchlm_1"] = _mb_per_s(n_bytes, each(ours.encode))
    res["tiktoken_1"] = _mb_per_s(n_bytes, each(tik.encode_ordinary))
    res["hf_1"] = _mb_per_s(n_bytes, each(lambda t: hf.encode(t, add_special_tokens=False)))
    ours = BPETokenizer.load(tok_dir)
    res["scratchlm_all"] = _mb_per_s(n_bytes, lambda: [ours.encode_batch(g) and None for g in groups])
    res["tiktoken_all"] = _mb_per_s(
        n_bytes, lambda: [tik.encode_ordinary_batch(g, num_threads=cores) and None for g in groups])
    res["hf_all"] = _mb_per_s(
        n_bytes, lambda: [hf.encode_batch(g, add_special_tokens=False) and None for g in groups])

    ours.export_hf(tok_dir / "hf-export")
    hf_export = Tokenizer.from_file(str(tok_dir / "hf-export" / "tokenizer.json"))
    same_tik = same_hf = True
    n_ours = n_hf = 0
    for g in groups:
        ids = ours.encode_batch(g)
        n_ours += sum(map(len, ids))
        same_tik &= ids == tik.encode_ordinary_batch(g, num_threads=cores)
        same_hf &= ids == [e.ids for e in hf_export.encode_batch(g, add_special_tokens=False)]
        n_hf += sum(len(e.ids) for e in hf.encode_batch(g, add_special_tokens=False))
    res.update(same_ids_tiktoken=same_tik, same_ids_hf_export=same_hf,
               bpt_scratchlm=n_bytes / n_ours, bpt_hf=n_bytes / n_hf, peak_mb=_peak_mb())
    return res


def run_phase(name: str, *args) -> dict:
    """Run one phase in a fresh child process and return its JSON result."""
    cmd = [sys.executable, __file__, "--phase", name, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {name} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def bench_one(label: str, corpus: list[Path], vocab: int, skip_train_hf: bool) -> None:
    texts = [t for p in corpus for t in read_texts(p)]
    mb = corpus_bytes(texts) / 1e6
    del texts
    work = BENCH_DIR / f"tok-{label}-{vocab}"
    paths = ",".join(map(str, corpus))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n== {label}: {mb:.1f} MB, vocab {vocab}, {len(os.sched_getaffinity(0))} cores, "
          f"load average {load}")
    ours = run_phase("train-scratchlm", paths, vocab, work / "scratchlm")
    print(f"train  scratchlm   {ours['seconds']:7.2f} s  peak {ours['peak_mb']:7.0f} MB"
          f"  (C extension: {ours['extension']})")
    hf = run_phase("train-hf", paths, vocab, work / "hf")
    print(f"train  HF          {hf['seconds']:7.2f} s  peak {hf['peak_mb']:7.0f} MB")
    print(f"train  speed ratio HF/scratchlm = {hf['seconds'] / ours['seconds']:.2f}x  (target >= 1)")
    enc = run_phase("encode", paths, work / "scratchlm", work / "hf")
    print(f"encode 1 process   scratchlm {enc['scratchlm_1']:6.1f} MB/s | HF {enc['hf_1']:6.1f} | "
          f"tiktoken {enc['tiktoken_1']:6.1f}")
    print(f"encode all cores   scratchlm {enc['scratchlm_all']:6.1f} MB/s | HF {enc['hf_all']:6.1f} | "
          f"tiktoken {enc['tiktoken_all']:6.1f}")
    print(f"  scratchlm/HF (1 process)            = {enc['scratchlm_1'] / enc['hf_1']:.2f}x (target >= 2)")
    print(f"  scratchlm/tiktoken (1 process)      = {enc['scratchlm_1'] / enc['tiktoken_1']:.2f}x (target >= 0.5)")
    print(f"  scratchlm all cores / tiktoken 1    = {enc['scratchlm_all'] / enc['tiktoken_1']:.2f}x (target >= 1)")
    diff = 100 * (enc["bpt_scratchlm"] / enc["bpt_hf"] - 1)
    print(f"bytes/token        scratchlm {enc['bpt_scratchlm']:.4f} | HF {enc['bpt_hf']:.4f} "
          f"({diff:+.2f}%, target within 1%)")
    print(f"ids identical      tiktoken export {enc['same_ids_tiktoken']}, HF export {enc['same_ids_hf_export']}")
    print(f"encode peak memory {enc['peak_mb']:.0f} MB (all contenders in one process)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50, help="size of the machine-text corpus")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--no-shared", action="store_true", help="skip the shared corpora")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        name, paths, *rest = args.phase
        corpus = [Path(p) for p in paths.split(",")]
        if name == "train-scratchlm":
            res = phase_train_scratchlm(corpus, int(rest[0]), Path(rest[1]))
        elif name == "train-hf":
            res = phase_train_hf(corpus, int(rest[0]), Path(rest[1]))
        else:
            res = phase_encode(corpus, Path(rest[0]), Path(rest[1]))
        print(json.dumps(res))
        return
    sys.stdout.reconfigure(line_buffering=True)
    corpus = build_corpus(args.mb)
    bench_one(f"machine-text-{args.mb:g}MB", [corpus], args.vocab, False)
    shared = sorted(SHARED_CORPORA.glob("*.jsonl")) if SHARED_CORPORA.is_dir() else []
    if shared and not args.no_shared:
        bench_one("shared-corpora", shared, args.vocab, False)


if __name__ == "__main__":
    main()
