"""How much of the INT4 round-to-nearest gap the calibrated methods close, on a trained model.

For a trained run (default: the speedrun's DPO model, runs/speedrun-final/dpo) and its dataset dir,
scores on the same held-out tokens (the speedrun's own eval documents: the first --tokens val tokens,
windows of the model's context, `speedrun.model_bpb`):

  fp32              the run as trained
  rtn               INT4 g64 round-to-nearest, every matrix (blocks, embedding, head)
  gptq              GPTQ (with its clip search) on the same matrices, same bits and group size
  awq               AWQ (activation-aware channel scales folded into the norms, then RTN + clip search)
  gptq+tune N       the GPTQ model with its scales/offsets tuned for N steps against fp32
  awq+tune N        the same for AWQ
  rtn+tune N        (--with-rtn-tune) the RTN model tuned the same way

and prints each one's bits per byte, its change vs fp32, the share of the RTN gap it closes
(1 - gap / rtn gap; issue 9's target: at least half) and the wall and CPU seconds of quantizing.
Every variant quantizes exactly the same set of matrices with the same bits and group size;
calibration is --windows windows of 256 tokens from the dataset's train split (seed 0), never the
scored val tokens. Deterministic on one machine; the times are not (the machine is shared).

Usage: python benchmarks/quant_gap.py [--run runs/speedrun-final] [--tokens 32768] [--windows 128]
       [--methods gptq,awq] [--tune-steps 200] [--with-rtn-tune] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def score(model, tokenizer, docs) -> float:
    from scratchlm.speedrun import model_bpb

    return model_bpb(model.eval(), tokenizer, docs)["bpb"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "speedrun-final",
                        help="speedrun dir (with dpo/ and data/), or a run dir given with --data")
    parser.add_argument("--data", type=Path, default=None, help="dataset dir (default: RUN/data)")
    parser.add_argument("--tokens", type=int, default=32768, help="held-out val tokens scored")
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--tune-steps", type=int, default=200)
    parser.add_argument("--tune-lr", type=float, default=1e-2)
    parser.add_argument("--methods", default="gptq,awq", help="calibrated methods, comma-separated")
    parser.add_argument("--with-rtn-tune", action="store_true", help="also tune the RTN model's scales")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    import torch

    from scratchlm.data.shards import Dataset
    from scratchlm.model.quant import quantize_model, sample_calibration_windows
    from scratchlm.runs import load_run
    from scratchlm.speedrun import eval_documents

    model_dir = args.run / "dpo" if (args.run / "dpo" / "config.json").exists() else args.run
    data_dir = args.data or args.run / "data"
    docs = eval_documents(Dataset.open(data_dir), args.tokens)
    base = load_run(model_dir)
    seq_len = min(256, base.model.config.max_seq_len)
    calibration = sample_calibration_windows(data_dir, args.windows, seq_len, seed=0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model {model_dir} ({base.model.num_parameters():,} parameters); {sum(map(len, docs))} val tokens; "
          f"{args.windows} calibration windows of {seq_len}")

    common = dict(bits=4, group_size=args.group_size, embed_bits="same", head_bits="same", progress=False)
    methods = args.methods.split(",")
    variants = [("fp32", None), ("rtn", dict(method="rtn"))]
    variants += [(m, dict(method=m)) for m in methods if m != "rtn"]
    if args.tune_steps:
        tuned = methods + (["rtn"] if args.with_rtn_tune and "rtn" not in methods else [])
        variants += [(f"{m}+tune {args.tune_steps}", dict(method=m, tune_steps=args.tune_steps, tune_lr=args.tune_lr))
                     for m in tuned]
    rows = []
    for name, spec in variants:
        run = load_run(model_dir)
        wall, cpu = time.perf_counter(), time.process_time()
        if spec is not None:
            quantize_model(run.model, calibration=calibration, **common, **spec)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append({"variant": name, "bpb": score(run.model, run.tokenizer, docs), "quantize_wall_s": wall,
                     "quantize_cpu_s": cpu, "load_average": os.getloadavg()[0]})
        print(f"  measured {name}: bpb {rows[-1]['bpb']:.4f}, quantize {wall:.1f} s wall / {cpu:.1f} s CPU, "
              f"load {rows[-1]['load_average']:.1f}", file=sys.stderr, flush=True)

    fp32, rtn = rows[0]["bpb"], rows[1]["bpb"]
    print(f"{'variant':16s} {'bpb':>8s} {'vs fp32':>8s} {'gap closed':>10s} {'wall s':>7s} {'CPU s':>7s} {'load':>5s}")
    for row in rows:
        row["vs_fp32"] = row["bpb"] / fp32 - 1
        row["gap_closed"] = 1 - (row["bpb"] - fp32) / (rtn - fp32) if rtn > fp32 else float("nan")
        print(f"{row['variant']:16s} {row['bpb']:8.4f} {100 * row['vs_fp32']:+7.2f}% {100 * row['gap_closed']:9.0f}% "
              f"{row['quantize_wall_s']:7.1f} {row['quantize_cpu_s']:7.1f} {row['load_average']:5.1f}")
    best = max(rows[2:], key=lambda r: r["gap_closed"])
    print(f"target (issue 9): a calibrated method closes >= 50% of the INT4 g{args.group_size} RTN gap; "
          f"best: {best['variant']} closes {100 * best['gap_closed']:.0f}%")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
