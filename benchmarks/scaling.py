"""Scaling: training throughput of 1 process against N processes under each parallel mode.

Runs `scratchlm pretrain` for a few steps at one model shape and one global batch, first as one
process (using all `--threads` threads), then under torchrun with `--nproc` processes (the
threads split between them) in each of `ddp`, `fsdp` and `pipeline`, and reads tokens/s and MFU
from each run's metrics.jsonl (median over logged steps, the first dropped as warm-up).
Repeats alternate the configurations, so machine load hits all alike. On a GPU machine pass
`--device cuda` and `--nproc` = GPUs to get each mode's MFU.

Not a test: it prints a table (and `--json` writes the figures) for docs/benchmarks.md.

    python benchmarks/scaling.py [--steps 12] [--repeats 2] [--nproc 2] [--work .bench/scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("ddp", "fsdp", "pipeline")


def prepare_data(work: Path, vocab: int) -> Path:
    """A tokenizer and a dataset dir from the builtin corpus, built once under `work`."""
    from scratchlm.data.shards import prepare_dataset
    from scratchlm.data.sources import iter_texts
    from scratchlm.tokenizer import BPETokenizer

    data_dir = work / f"data-{vocab}"
    if (data_dir / "index.json").is_file():
        return data_dir
    tok_dir = work / f"tokenizer-{vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        BPETokenizer.train(iter_texts(["builtin:python-stdlib"]), vocab, progress=False).save(tok_dir)
    prepare_dataset(["builtin:python-stdlib"], str(tok_dir), data_dir, dedup="none", filters="none",
                    val_fraction=0.05)
    return data_dir


def settings(args) -> list[str]:
    return [
        f"model.preset={args.preset}", f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}",
        f"model.n_head={args.n_head}", f"train.seq_len={args.seq_len}", f"train.max_steps={args.steps}",
        f"train.batch_tokens={args.batch * args.seq_len}", "train.eval_every=0", "train.ckpt_every=0",
        "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.warmup_steps=2",
        f"train.device={args.device}", f"train.dtype={args.dtype}",
    ]


def run_one(args, data: Path, mode: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    nproc = 1 if mode == "single" else args.nproc
    # one process: all threads; N data-parallel processes: the batch and the threads split
    micro = args.batch if mode in ("single", "pipeline") else args.batch // nproc
    sets = [*settings(args), f"train.micro_batch_size={micro}",
            f"parallel.mode={'none' if mode == 'single' else mode}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // nproc))}
    cli = ["-m", "scratchlm", "pretrain", "--data", str(data), "--out", str(out), "--set", *sets]
    if mode == "single":
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records if r.get("mfu") is not None),
            "wall_s": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-mini")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--work", default=str(REPO / ".bench" / "scaling"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args.vocab)
    modes = ["single", *args.modes.split(",")]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            results[mode].append(run_one(args, data, mode, work / f"run-{mode}"))
            print(f"{mode:9s} {results[mode][-1]['tokens_per_sec']:9.0f} tok/s", file=sys.stderr)

    base = statistics.median(r["tokens_per_sec"] for r in results["single"])
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"device {args.device}; {args.preset} n_layer={args.n_layer} d_model={args.d_model} "
          f"seq {args.seq_len}, global batch {args.batch} sequences, {args.steps} steps x {args.repeats}")
    print(f"{'mode':10s} {'procs':>5s} {'tok/s (median)':>15s} {'runs':>24s} {'vs 1 proc':>9s} {'MFU':>7s}")
    summary = {}
    for mode in modes:
        tps = [r["tokens_per_sec"] for r in results[mode]]
        med = statistics.median(tps)
        mfu = statistics.median(r["mfu"] for r in results[mode])
        summary[mode] = {"tokens_per_sec": med, "runs": tps, "ratio": med / base, "mfu": mfu}
        print(f"{mode:10s} {1 if mode == 'single' else args.nproc:5d} {med:15.0f} "
              f"{', '.join(f'{t:.0f}' for t in tps):>24s} {med / base:8.2f}x {mfu:7.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
