"""Benchmark: LoRA vs full fine-tuning (and QLoRA) in scratchlm's SFT path, side by side.

For one model shape, each variant trains the same SFT task (packed conversations of random
tokens with an assistant mask, so no tokenizer or data is needed) through the real training loop
for a few steps, each in its own process so that peak memory is its own. Printed per variant:
trainable parameters, their share of the model, peak resident memory (RSS, includes the Python and
torch runtime), the analytic training-state memory (weights + gradients + AdamW moments),
tokens/s (wall clock) and tokens per CPU-second (steadier on a shared machine); then the ratios
against full fine-tuning.

    .venv/bin/python benchmarks/posttrain.py                      # llama-mini shape, CPU
    .venv/bin/python benchmarks/posttrain.py --preset gpt2-mini --steps 10 --rank 16

Not a quality benchmark (see tests/test_sft.py and tests/test_dpo.py for learning checks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": {"rank": 0, "qlora_bits": 0},
    "lora": {"rank": None, "qlora_bits": 0},
    "qlora-int4": {"rank": None, "qlora_bits": 4},
}


def run_variant(args, variant: str) -> dict:
    """Train in this process and return the measurements (called in a child process)."""
    import tempfile

    import torch

    from scratchlm.config import load_config
    from scratchlm.model.config import model_config
    from scratchlm.model.lora import trainable_parameters
    from scratchlm.model.transformer import Transformer
    from scratchlm.posttrain.common import LoRASection, register_config_sections, setup_lora
    from scratchlm.posttrain.sft import Example, SFTTask
    from scratchlm.train.trainer import train

    torch.set_num_threads(args.threads)
    register_config_sections()
    torch.manual_seed(0)
    model = Transformer(model_config(args.preset, max_seq_len=args.seq_len))
    total = sum(p.numel() for p in model.parameters())
    spec = VARIANTS[variant]
    section = LoRASection(rank=spec["rank"] if spec["rank"] is not None else args.rank, alpha=2.0 * args.rank,
                          qlora_bits=spec["qlora_bits"])
    setup_lora(model, section)
    trainable = trainable_parameters(model)
    state_bytes = training_state_bytes(model)

    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    examples = []
    for _ in range(256):  # conversations of 64..192 tokens, the last third being the answer
        n = int(torch.randint(64, 192, (1,), generator=g))
        ids = torch.randint(0, vocab, (n + 1,), generator=g).tolist()
        cut = 2 * n // 3
        examples.append(Example(ids[:-1], [-100] * cut + ids[cut + 1:]))
    task = SFTTask(examples, [], args.seq_len, args.batch, pad_id=0, packing=True, seed=0, device=args.device)
    config = load_config(overrides=[
        f"train.max_steps={args.steps + args.warmup}", f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}", "train.eval_every=0", "train.ckpt_every=0",
        "train.log_every=1", "train.progress=false", "train.tensorboard=false", f"train.dtype={args.dtype}",
        f"train.device={args.device}", "train.lr=1e-4", "train.warmup_steps=1",
    ])
    records, clocks = [], []

    def on_step(record):
        records.append(record)
        clocks.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as out:
        train(config, model, task, out, on_step=on_step)
    # timed window: from the end of the warm-up steps to the last step
    tokens = records[-1]["tokens"] - records[args.warmup - 1]["tokens"]
    wall = clocks[-1][0] - clocks[args.warmup - 1][0]
    cpu = clocks[-1][1] - clocks[args.warmup - 1][1]
    tok_s, tok_cpu_s = tokens / wall, tokens / cpu
    peak_gpu = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return {
        "variant": variant, "params": total, "trainable": trainable, "state_mb": state_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": peak_gpu / 2**20 if peak_gpu else None, "tokens_per_sec": tok_s, "tokens_per_cpu_sec": tok_cpu_s,
    }


def training_state_bytes(model) -> int:
    """Weights and buffers as stored, plus a gradient and two AdamW moments per trainable value."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 3 * trainable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-mini")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args, args.child)))
        return 0

    results = []
    for variant in args.variants.split(","):
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", variant]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"shape {args.preset}, seq {args.seq_len}, batch {args.batch}, dtype {args.dtype}, device {args.device}, "
          f"LoRA rank {args.rank} on all block projections, {args.steps} timed steps")
    print(f"{'variant':<12}{'trainable':>14}{'share':>9}{'state MB':>10}{'peak RSS MB':>13}{'tokens/s':>11}"
          f"{'tok/CPU-s':>11}")
    for r in results:
        print(f"{r['variant']:<12}{r['trainable']:>14,}{r['trainable'] / r['params']:>9.2%}{r['state_mb']:>10.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['tokens_per_sec']:>11,.0f}{r['tokens_per_cpu_sec']:>11,.0f}"
              + (f"   GPU peak {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") else ""))
    full = next((r for r in results if r["variant"] == "full"), None)
    if full:
        for r in results:
            if r is not full:
                print(f"{r['variant']} vs full: trainable x{r['trainable'] / full['trainable']:.4f}, "
                      f"state memory x{r['state_mb'] / full['state_mb']:.2f}, peak RSS x"
                      f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}, tokens/s x"
                      f"{r['tokens_per_sec'] / full['tokens_per_sec']:.2f}, tokens/CPU-s x"
                      f"{r['tokens_per_cpu_sec'] / full['tokens_per_cpu_sec']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
