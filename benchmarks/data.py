"""Data pipeline benchmark: the three targets of issue 3, side by side with their peers.

Builds (once, cached under .bench/data/) a JSONL corpus of distinct documents, each 8-40
paragraphs drawn at random from the shared corpora (../shared/corpora) or, without them, from
the Python standard library's source, and a BPE tokenizer trained on a slice of it. Then:

  throughput  `prepare_dataset` (--workers processes) end to end over --mb MB, against the
              tokenizer's own `encode_batch` (same workers) over the same texts already in
              memory: the ratio of MB/s (target >= 0.8), and the ratio of CPU seconds (self +
              workers), which a loaded machine skews less. Two settings: filters and dedup off
              (what the pipeline itself costs) and the defaults (quality rules + exact dedup).
              --repeat rounds of (peer, off, defaults), interleaved; medians of the rounds.
  rules       the default prose quality rules alone, in this process, over the --mb MB of
              texts: CPU seconds per MB (time.process_time) of the readable Python reference
              and of the C fast path, and whether every decision is the same.
  minhash     MinHash signatures + LSH queries/inserts over --mb MB in one process
              (target: 50 MB in under 60 s), with the candidate probabilities of the S-curve.
  memory      `prepare_dataset` over --memory-mb MB in a child process; the peak of the summed
              resident memory of it and its workers, sampled every 0.1 s (target < 1 GB).

Not a test: the machine is shared, so timings are noisy; run it twice.
Usage: python benchmarks/data.py [--quick] [--only throughput,rules,minhash,memory] [--mb 50]
       [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench" / "data"
SHARED = Path(os.environ.get("SCRATCHLM_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))


# -- inputs -----------------------------------------------------------------------------------
def paragraph_pool() -> list[str]:
    texts = []
    corpora = sorted((SHARED / "corpora").glob("*.jsonl"))
    if corpora:
        for path in corpora:
            with open(path, encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for line in f]
    else:
        from scratchlm.data.builtin import python_stdlib_files

        texts = [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_files()]
    pool = [p.strip() for t in texts for p in t.split("\n\n") if len(p.split()) >= 8]
    return pool


def corpus(mb: int) -> Path:
    """A JSONL file of about `mb` MB of distinct documents (random draws of paragraphs)."""
    path = BENCH / f"corpus_{mb}mb.jsonl"
    if path.exists():
        return path
    BENCH.mkdir(parents=True, exist_ok=True)
    pool = paragraph_pool()
    rng = random.Random(mb)
    target, written = mb * 1_000_000, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        n = 0
        while written < target:
            text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(8, 40)))
            text = f"Document {n}.\n\n{text}"
            line = json.dumps({"id": n, "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(text.encode("utf-8"))
            n += 1
    tmp.rename(path)
    return path


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def tokenizer(vocab: int):
    from scratchlm.tokenizer import BPETokenizer, load_tokenizer

    directory = BENCH / f"tokenizer_{vocab}"
    if (directory / "tokenizer.json").exists():
        return load_tokenizer(directory)
    texts = read_texts(corpus(5))
    tok = BPETokenizer.train(texts, vocab, max_bytes=3_000_000, progress=False)
    tok.save(directory)
    return tok


# -- the three measurements -------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pools' workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _close_tokenizer_pool(tok) -> None:
    try:
        from scratchlm.tokenizer.parallel import close_pool
    except ImportError:
        return
    close_pool(tok)


def _timed(run) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its reaped children, result) of run()."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = run()
    return time.perf_counter() - t0, _cpu_seconds() - c0, result


def bench_throughput(mb: int, workers: int, vocab: int, repeat: int = 3) -> dict:
    """Wall-clock MB/s side by side, plus CPU seconds per MB, which a loaded machine skews less.

    `repeat` rounds, each timing the peer, then `prepare` without and with the filters, so that
    a burst of load from elsewhere hits one round rather than one side; the ratios reported
    are the medians of the rounds' ratios (and each round's are kept).
    """
    from scratchlm.data.shards import prepare_dataset

    path = corpus(mb)
    tok = tokenizer(vocab)
    texts = read_texts(path)
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    def peer():
        tok.encode_batch(texts, workers=workers)
        _close_tokenizer_pool(tok)  # its pool is persistent: reap the workers so their CPU counts

    sides = (("plain", {"filters": "none", "dedup": "none"}),
             ("default", {"filters": "default", "dedup": "exact"}))
    rounds = []
    for _ in range(repeat):
        peer_s, peer_cpu, _ = _timed(peer)
        row = {"encode_batch": {"seconds": round(peer_s, 3), "cpu_s": round(peer_cpu, 3)}}
        for label, kwargs in sides:
            out = BENCH / f"out_{label}"
            seconds, cpu, ds = _timed(lambda: prepare_dataset(
                path, tok, out, workers=workers, progress=False, force=True, **kwargs))
            row[label] = {"seconds": round(seconds, 3), "cpu_s": round(cpu, 3),
                          "ratio": round(peer_s / seconds, 3), "cpu_ratio": round(peer_cpu / cpu, 3),
                          "kept_mb": round(ds.index["stats"]["kept"]["bytes"] / 1e6, 1),
                          "tokens": sum(ds.num_tokens(s) for s in ("train", "val"))}
        rounds.append(row)
    peer_s = statistics.median(r["encode_batch"]["seconds"] for r in rounds)
    peer_cpu = statistics.median(r["encode_batch"]["cpu_s"] for r in rounds)
    results = {"mb": round(text_mb, 1), "workers": workers, "vocab": vocab, "repeat": repeat,
               "encode_batch_mb_s": round(text_mb / peer_s, 3),
               "encode_batch_cpu_s_per_mb": round(peer_cpu / text_mb, 4)}
    for label, _ in sides:
        mine = [r[label] for r in rounds]
        seconds = statistics.median(m["seconds"] for m in mine)
        results[label] = {
            "mb_s": round(text_mb / seconds, 3),
            "cpu_s_per_mb": round(statistics.median(m["cpu_s"] for m in mine) / text_mb, 4),
            "ratio_vs_encode_batch": statistics.median(m["ratio"] for m in mine),
            "cpu_ratio_vs_encode_batch": statistics.median(m["cpu_ratio"] for m in mine),
            "round_ratios": [m["ratio"] for m in mine],
            "round_cpu_ratios": [m["cpu_ratio"] for m in mine],
            "kept_mb": mine[-1]["kept_mb"], "tokens": mine[-1]["tokens"]}
    results["rounds"] = rounds
    return results


def bench_rules(mb: int) -> dict:
    """CPU time of the prose rules (normalised texts, default thresholds): reference vs C path."""
    from scratchlm.data import filters

    texts = [filters.normalize_text(t) for t in read_texts(corpus(mb))]
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    config = filters.FilterConfig()
    result = {"mb": round(text_mb, 1), "docs": len(texts),
              "extension_built": filters._fastfilters is not None}
    decisions = {}
    paths = [("reference", filters._check_prose)]
    if filters._fastfilters is not None:
        paths.append(("fast", filters._check_prose_fast))
    for label, check in paths:
        c0 = time.process_time()
        decisions[label] = [check(text, config) for text in texts]
        result[f"{label}_cpu_s_per_mb"] = round((time.process_time() - c0) / text_mb, 4)
    if "fast" in decisions:
        result["speedup"] = round(result["reference_cpu_s_per_mb"] / result["fast_cpu_s_per_mb"], 1)
        result["same_decisions"] = decisions["fast"] == decisions["reference"]
    result["removed"] = sum(d is not None for d in decisions["reference"])
    return result


def bench_minhash(mb: int) -> dict:
    from scratchlm.data.dedup import LSHIndex, MinHashConfig, MinHasher

    texts = read_texts(corpus(mb))
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    config = MinHashConfig()
    hasher, index = MinHasher(config), LSHIndex(config)
    t0 = time.perf_counter()
    duplicates = 0
    for text in texts:
        signature = hasher.signature(text)
        if index.find(signature) is None:
            index.add(signature)
        else:
            duplicates += 1
    seconds = time.perf_counter() - t0
    curve = {str(s): round(config.candidate_probability(s), 4)
             for s in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
    return {"mb": round(text_mb, 1), "docs": len(texts), "seconds": round(seconds, 2),
            "mb_s": round(text_mb / seconds, 2), "seconds_per_50mb": round(50 * seconds / text_mb, 1),
            "near_duplicates_found": duplicates, "config": config.to_dict(),
            "candidate_probability": curve}


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def bench_memory(mb: int, workers: int, vocab: int) -> dict:
    path = corpus(mb)
    tokenizer(vocab)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from scratchlm.data.shards import prepare_dataset\n"
        "from scratchlm.tokenizer import load_tokenizer\n"
        "ds = prepare_dataset(%r, load_tokenizer(%r), %r, workers=%d, progress=False, force=True)\n"
        "print(sum(ds.num_tokens(s) for s in ('train', 'val')))\n"
    ) % (str(REPO / "src"), str(path), str(BENCH / f"tokenizer_{vocab}"),
         str(BENCH / "out_memory"), workers)
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(child.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    tokens = child.stdout.read().strip()
    if child.returncode != 0:
        raise SystemExit(f"memory run failed with status {child.returncode}")
    input_mb = path.stat().st_size / 1e6
    return {"input_mb": round(input_mb, 1), "workers": workers, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak / 1e6, 1), "tokens": int(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (5 MB / 50 MB)")
    parser.add_argument("--only", default="throughput,rules,minhash,memory")
    parser.add_argument("--mb", type=int, default=None, help="throughput and minhash input size")
    parser.add_argument("--memory-mb", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="throughput rounds (medians)")
    args = parser.parse_args()
    mb = args.mb or (5 if args.quick else 50)
    memory_mb = args.memory_mb or (50 if args.quick else 500)
    report = {"machine": f"{os.cpu_count()} cores, {sys.platform}, python {sys.version.split()[0]}",
              "load_average_at_start": os.getloadavg()}
    only = args.only.split(",")
    if "throughput" in only:
        report["throughput"] = r = bench_throughput(mb, args.workers, args.vocab, args.repeat)
        print(f"throughput  {r['mb']} MB, {args.workers} workers, medians of {args.repeat} "
              f"rounds: encode_batch {r['encode_batch_mb_s']} MB/s; prepare (no filters/dedup) "
              f"{r['plain']['mb_s']} MB/s = {r['plain']['ratio_vs_encode_batch']}x; prepare "
              f"(defaults) {r['default']['mb_s']} MB/s = {r['default']['ratio_vs_encode_batch']}x "
              f"(target >= 0.8x; rounds {r['default']['round_ratios']}); by CPU time: "
              f"{r['plain']['cpu_ratio_vs_encode_batch']}x / "
              f"{r['default']['cpu_ratio_vs_encode_batch']}x (rounds "
              f"{r['default']['round_cpu_ratios']})", flush=True)
    if "rules" in only:
        report["rules"] = r = bench_rules(mb)
        print(f"rules       {r['mb']} MB, 1 process: reference {r['reference_cpu_s_per_mb']} "
              f"CPU-s/MB, C path {r.get('fast_cpu_s_per_mb', '(not built)')} CPU-s/MB "
              f"({r.get('speedup', '-')}x), same decisions: {r.get('same_decisions', '-')}",
              flush=True)
    if "minhash" in only:
        report["minhash"] = r = bench_minhash(mb)
        print(f"minhash     {r['mb']} MB in {r['seconds']} s = {r['mb_s']} MB/s, "
              f"{r['seconds_per_50mb']} s per 50 MB (target < 60 s)", flush=True)
    if "memory" in only:
        report["memory"] = r = bench_memory(memory_mb, args.workers, args.vocab)
        print(f"memory      {r['input_mb']} MB input: peak RSS {r['peak_rss_mb']} MB "
              f"(main + workers) in {r['seconds']} s (target < 1000 MB)", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
