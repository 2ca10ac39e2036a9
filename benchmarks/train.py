"""Training speed and quality: `scratchlm pretrain` against a plain minimal GPT loop, in one run.

What it measures, at one model shape (default: n_layer 4, n_head 4, d_model 256, seq 256,
batch 16, vocab 8192 -- the shape nanoGPT's train.py was measured at on this CPU, ~3,900 tok/s):
1. throughput: tokens/s and MFU of scratchlm's training loop (its default precision here, bf16
   autocast on a CPU with native bf16) and of the reference loop written below (fp32, as
   nanoGPT on a CPU), alternating A B A B so machine load hits both alike; medians reported,
   per wall-clock second and per CPU-second of this process (the figure a shared, loaded
   machine distorts least; run with OMP_WAIT_POLICY=PASSIVE so idle threads do not spin);
2. quality: each trains for the same wall-clock minutes on the same data, then both are scored
   by one function on the same validation windows: loss and bits per byte.

The reference is a nanoGPT-style GPT with nanoGPT train.py's defaults (pre-LN, learned positions,
GELU, tied embeddings, SDPA, no biases in Linear or LayerNorm, no dropout) and torch's AdamW,
warm-up + cosine, clipping: the plain loop a person would write. scratchlm trains the same shape
(its gpt2 preset with `model.bias=false`; its GELU is GPT-2's tanh form).
Not a test: it prints figures (and `--json` writes them) for docs/benchmarks.md.

    python benchmarks/train.py [--minutes 2] [--steps 20] [--repeats 2] [--work .bench/train]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLM_SHARED", REPO.parent / "shared"))


# ---------------------------------------------------------------------------------------------
# The reference: a minimal GPT and its training loop


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(RefBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def reference_train(args, data_dir: Path, *, max_steps: int, budget_s: float, on_step=None):
    """The plain loop: fp32, AdamW (decay on matrices), warm-up + cosine, clip 1.0."""
    from scratchlm.data.loader import TokenLoader

    torch.manual_seed(0)
    model = RefGPT(args.vocab, args.seq, args.n_layer, args.n_head, args.d_model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    loader = TokenLoader(data_dir, split="train", seq_len=args.seq, batch_size=args.batch, seed=0)
    start = time.perf_counter()
    for step in range(max_steps):
        if time.perf_counter() - start >= budget_s:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        lr = args.lr * _lr_factor(step, max_steps, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = loader.next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step + 1, x.numel(), time.perf_counter() - t0, loss.item(), time.process_time() - c0)
    return model


def _lr_factor(step: int, max_steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# scratchlm


def scratchlm_config(args, extra: list[str]):
    from scratchlm.config import load_config

    return load_config(None, [
        "model.preset=gpt2-mini", "model.bias=false", f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}",
        f"model.d_model={args.d_model}", f"model.max_seq_len={args.seq}", f"train.seq_len={args.seq}",
        f"train.micro_batch_size={args.batch}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}",
        f"train.dtype={args.dtype}", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
        "train.tensorboard=false", "train.log_every=1", f"train.compile={str(args.compile).lower()}",
        *extra,
    ])


def scratchlm_train(args, data_dir: Path, out: Path, *, max_steps: int, minutes: float = 0.0, on_step=None):
    import shutil

    from scratchlm.train.pretrain import pretrain

    shutil.rmtree(out, ignore_errors=True)
    config = scratchlm_config(args, [f"train.max_steps={max_steps}", f"train.max_minutes={minutes}"])
    pretrain(data_dir, out, config, on_step=on_step)
    from scratchlm.runs import load_run

    return load_run(out).model


# ---------------------------------------------------------------------------------------------
# Shared scoring and data


@torch.no_grad()
def score(model, data_dir: Path, args, tokenizer) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte on the first `--val-batches` windows."""
    from scratchlm.data.loader import TokenLoader
    from scratchlm.train.pretrain import token_byte_lengths

    model.eval()
    nbytes = token_byte_lengths(tokenizer, args.vocab)
    loader = TokenLoader(data_dir, split="val", seq_len=args.seq, batch_size=args.batch, mode="sequential")
    nats = nats_text = total_bytes = tokens = 0.0
    for _ in range(args.val_batches):
        x, y = loader.next_batch()
        losses = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none")
        b = nbytes[y.flatten()]
        nats += losses.sum().item()
        tokens += losses.numel()
        nats_text += (losses * (b > 0)).sum().item()
        total_bytes += b.sum().item()
    return {"val_loss": nats / tokens, "val_bpb": nats_text / (math.log(2) * total_bytes)}


def prepare_data(args) -> Path:
    """A tokenizer of `--vocab` ids and a dataset dir, built once under `--work`."""
    from scratchlm.data.shards import prepare_dataset
    from scratchlm.data.sources import iter_texts
    from scratchlm.tokenizer import BPETokenizer

    work = Path(args.work)
    data_dir = work / f"data-{args.vocab}"
    if (data_dir / "index.json").is_file():
        return data_dir
    corpora = sorted((SHARED / "corpora").glob("*.jsonl"))
    sources = [str(p) for p in corpora] or ["builtin:python-stdlib"]
    tok_dir = work / f"tokenizer-{args.vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        print(f"training a {args.vocab}-id tokenizer on {', '.join(sources)} ...", file=sys.stderr)
        tok = BPETokenizer.train(iter_texts(sources), args.vocab, max_bytes=args.tokenizer_bytes)
        tok.save(tok_dir)
    print("preparing the dataset ...", file=sys.stderr)
    prepare_dataset(sources, str(tok_dir), data_dir, dedup="none", filters="none", val_fraction=0.05)
    return data_dir


def flops_per_token(args) -> float:
    from scratchlm.model.config import model_config
    from scratchlm.model.transformer import Transformer

    cfg = model_config("gpt2-mini", bias=False, vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head,
                       d_model=args.d_model, max_seq_len=args.seq)
    return Transformer(cfg).flops_per_token(args.seq)


# ---------------------------------------------------------------------------------------------
# The benchmark


def measure_throughput(args, data_dir: Path) -> dict:
    from scratchlm.train.trainer import estimate_peak_flops, resolve_dtype

    steps = args.warmup_steps + args.steps
    ours, ref, ours_cpu, ref_cpu = [], [], [], []
    for r in range(args.repeats):
        times = []
        reference_train(args, data_dir, max_steps=steps, budget_s=math.inf,
                        on_step=lambda s, n, dt, loss, cpu: times.append((s, n, dt, cpu)))
        kept = [(n, dt, cpu) for s, n, dt, cpu in times if s > args.warmup_steps]
        ref.append(sum(n for n, _, _ in kept) / sum(dt for _, dt, _ in kept))
        ref_cpu.append(sum(n for n, _, _ in kept) / sum(cpu for _, _, cpu in kept))
        print(f"  round {r + 1}: reference {ref[-1]:,.0f} tok/s, {ref_cpu[-1]:,.0f} tok per CPU-s",
              file=sys.stderr)

        records, cpu_marks = [], []

        def on_step(rec):  # CPU seconds between consecutive logged steps (log_every=1)
            cpu_marks.append(time.process_time())
            records.append(rec)

        scratchlm_train(args, data_dir, Path(args.work) / "run-speed", max_steps=steps, on_step=on_step)
        # a record with val_* was followed by an evaluation before on_step: its CPU interval is
        # not training (tokens_per_sec, measured inside the loop, already leaves it out)
        pairs = [(prev, rec, c1 - c0) for (prev, rec), (c0, c1)
                 in zip(zip(records, records[1:]), zip(cpu_marks, cpu_marks[1:]))
                 if rec["step"] > args.warmup_steps and not any(k.startswith("val_") for k in rec)]
        tokens = sum(rec["tokens"] - prev["tokens"] for prev, rec, _ in pairs)
        ours.append(tokens / sum((rec["tokens"] - prev["tokens"]) / rec["tokens_per_sec"] for prev, rec, _ in pairs))
        ours_cpu.append(tokens / sum(cpu for _, _, cpu in pairs))
        print(f"  round {r + 1}: scratchlm {ours[-1]:,.0f} tok/s, {ours_cpu[-1]:,.0f} tok per CPU-s "
              f"({len(pairs)} steps)", file=sys.stderr)
    fpt = flops_per_token(args)
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    peak_ours, peak_ref = estimate_peak_flops(device, dtype), estimate_peak_flops(device, torch.float32)
    med_ours, med_ref = statistics.median(ours), statistics.median(ref)
    cpu_ours, cpu_ref = statistics.median(ours_cpu), statistics.median(ref_cpu)
    return {
        "scratchlm_tok_s": med_ours, "reference_tok_s": med_ref, "ratio": med_ours / med_ref,
        "scratchlm_rounds": ours, "reference_rounds": ref,
        # per CPU-second: what a loaded machine distorts least (it counts only time we ran)
        "scratchlm_tok_per_cpu_s": cpu_ours, "reference_tok_per_cpu_s": cpu_ref,
        "ratio_per_cpu_s": cpu_ours / cpu_ref,
        "scratchlm_cpu_rounds": ours_cpu, "reference_cpu_rounds": ref_cpu,
        "scratchlm_mfu": med_ours * fpt / peak_ours, "reference_mfu": med_ref * fpt / peak_ref,
        "scratchlm_dtype": str(dtype).replace("torch.", ""), "flops_per_token": fpt,
        "peak_flops_scratchlm": peak_ours, "peak_flops_reference": peak_ref,
        "vs_nanogpt_3900": med_ours / 3900.0,
    }


def measure_quality(args, data_dir: Path, speed: dict) -> dict:
    from scratchlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_dir / "tokenizer")
    budget = args.minutes * 60
    per_step = args.batch * args.seq
    # each plans its cosine schedule over the steps its measured speed fits in the budget
    steps_ref = max(args.warmup + 1, int(speed["reference_tok_s"] * budget / per_step))
    steps_ours = max(args.warmup + 1, int(speed["scratchlm_tok_s"] * budget / per_step))
    ref_steps = []
    ref_model = reference_train(args, data_dir, max_steps=steps_ref, budget_s=budget,
                                on_step=lambda s, n, dt, loss, cpu: ref_steps.append(s))
    ref_score = score(ref_model, data_dir, args, tokenizer)
    our_steps = []
    our_model = scratchlm_train(args, data_dir, Path(args.work) / "run-quality", max_steps=steps_ours,
                                minutes=args.minutes, on_step=lambda rec: our_steps.append(rec["step"]))
    our_score = score(our_model, data_dir, args, tokenizer)
    return {"minutes": args.minutes, "reference_steps": len(ref_steps), "scratchlm_steps": max(our_steps, default=0),
            "reference": ref_score, "scratchlm": our_score}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="lr warm-up steps (both loops)")
    p.add_argument("--dtype", default="auto", help="scratchlm's train.dtype")
    p.add_argument("--compile", action="store_true", help="scratchlm with train.compile=true")
    p.add_argument("--steps", type=int, default=20, help="timed steps per throughput round")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per round")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget of each quality run; 0 skips")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--tokenizer-bytes", type=int, default=4_000_000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--work", default=str(REPO / ".bench" / "train"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = prepare_data(args)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_at_start": os.getloadavg(),
        "shape": {k: getattr(args, k) for k in ("n_layer", "n_head", "d_model", "seq", "batch", "vocab")},
    }
    print("throughput ...", file=sys.stderr)
    results["throughput"] = speed = measure_throughput(args, data_dir)
    print(f"scratchlm {speed['scratchlm_tok_s']:,.0f} tok/s ({speed['scratchlm_dtype']}, MFU "
          f"{speed['scratchlm_mfu']:.1%}) vs reference {speed['reference_tok_s']:,.0f} tok/s (fp32, MFU "
          f"{speed['reference_mfu']:.1%}): {speed['ratio']:.2f}x; {speed['vs_nanogpt_3900']:.2f}x nanoGPT's 3,900")
    print(f"per CPU-second: scratchlm {speed['scratchlm_tok_per_cpu_s']:,.0f} vs reference "
          f"{speed['reference_tok_per_cpu_s']:,.0f} tokens: {speed['ratio_per_cpu_s']:.2f}x")
    if args.minutes > 0:
        print(f"quality: {args.minutes} min each ...", file=sys.stderr)
        results["quality"] = q = measure_quality(args, data_dir, speed)
        print(f"after {args.minutes} min: scratchlm val_bpb {q['scratchlm']['val_bpb']:.4f} "
              f"({q['scratchlm_steps']} steps) vs reference {q['reference']['val_bpb']:.4f} "
              f"({q['reference_steps']} steps)")
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
