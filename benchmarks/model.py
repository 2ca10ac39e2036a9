"""Benchmark: the Transformer's training step (forward + backward) against transformers' models.

Same shape, same weights, same batch, same thread count, in one run: scratchlm's `gpt2` preset
against `GPT2LMHeadModel`, and its `llama` preset against `LlamaForCausalLM`, in fp32 and with
bf16 autocast (this CPU multiplies bf16 several times faster than fp32). The default shape is the
one nanoGPT is measured at in issue 4 (4 layers, 4 heads, d_model 256, 256 tokens, batch 16,
vocab 8192). Logits are checked equal before timing. Each side is timed in alternation, best of
--repeats, so load from other processes hits both alike; the loss is the same cross-entropy.

    python benchmarks/model.py [--threads 2] [--repeats 3] [--steps 3] [--batch 16] [--seq 256]

Not a test: the machine is shared, timings are noisy; run it twice. docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_pair(family: str, args):
    """(ours, theirs) with identical weights, both in train mode with dropout off."""
    import transformers
    from test_model_hf import gpt2_state_dict, llama_state_dict  # the mappings the oracle tests use

    from scratchlm.model import Transformer, model_config

    shape = dict(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                 max_seq_len=args.seq, dropout=0.0)
    if family == "llama":
        shape["n_kv_head"] = args.heads
    torch.manual_seed(0)
    ours = Transformer(model_config(family, **shape)).train()
    cfg = ours.config
    if family == "gpt2":
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        ))
        theirs.load_state_dict(gpt2_state_dict(ours), strict=False)
    else:
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
        ))
        theirs.load_state_dict(llama_state_dict(ours), strict=True)
    return ours, theirs.train()


def step_fn(model, is_hf: bool, idx, targets, dtype):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(idx).logits if is_hf else model(idx)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--families", default="gpt2,llama")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} threads; batch {args.batch} x {args.seq}, {args.layers} layers, d_model "
          f"{args.d_model}, {args.heads} heads, vocab {args.vocab}; forward + backward, best of {args.repeats}")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    tokens = args.batch * args.seq
    for family in args.families.split(","):
        ours, theirs = build_pair(family, args)
        with torch.no_grad():
            diff = (ours(idx[:2]) - theirs(idx[:2]).logits).abs().max().item()
        assert diff < 1e-4, f"{family}: logits differ by {diff}"
        for dtype in args.dtypes.split(","):
            steps = {"scratchlm": step_fn(ours, False, idx, targets, dtype),
                     "transformers": step_fn(theirs, True, idx, targets, dtype)}
            for step in steps.values():
                step()  # warm-up: allocator, kernel selection
            best = {name: float("inf") for name in steps}
            for _ in range(args.repeats):
                for name, step in steps.items():
                    best[name] = min(best[name], timed(step, args.steps))
            ours_tps, theirs_tps = tokens / best["scratchlm"], tokens / best["transformers"]
            print(f"{family:5s} {dtype:4s}  scratchlm {ours_tps:8.0f} tok/s   transformers {theirs_tps:8.0f} tok/s"
                  f"   ratio {ours_tps / theirs_tps:.2f}x")


if __name__ == "__main__":
    main()
