"""The `scratchlm sft` and `scratchlm dpo` verbs: thin argument parsing over `posttrain.pipeline`.

Not for logic: everything here is callable from Python as `run_sft` / `run_dpo`.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    sft = subparsers.add_parser(
        "sft", help="supervised fine-tuning on conversations (chat template, LoRA/QLoRA optional)",
        description="Fine-tune a run dir on chat data. DATA is JSONL in the messages layout "
        '({"messages": [{"role", "content"}, ...]}) or the Alpaca layout (instruction, input, '
        "output), or builtin:python-stdlib (docstring+signature -> body). Re-run to resume.",
    )
    _common(sft, "a pretrained run dir")
    sft.add_argument("--padding", action="store_true",
                     help="one conversation per row, padded (default: pack several per window)")
    sft.set_defaults(func=_run_sft)

    dpo = subparsers.add_parser(
        "dpo", help="direct preference optimization on {prompt, chosen, rejected} pairs",
        description="Align an SFT run dir on preference pairs (JSONL {prompt, chosen, rejected}, "
        "strings or message lists, or builtin:python-stdlib: real function vs a corrupted one). "
        "The reference is the starting model; its log-probs are computed once and cached.",
    )
    _common(dpo, "an SFT run dir")
    dpo.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    dpo.add_argument("--loss", choices=["sigmoid", "ipo", "conservative"], help="loss variant (default sigmoid)")
    dpo.add_argument("--label-smoothing", type=float, help="flip probability of the conservative loss")
    dpo.set_defaults(func=_run_dpo)


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", required=True, metavar="RUN", help=f"{what} (config.json, model.safetensors, tokenizer/)")
    p.add_argument("--data", nargs="+", metavar="DATA", help="JSONL files or builtin:python-stdlib (the default)")
    p.add_argument("--val-data", nargs="+", metavar="DATA", help="held-out JSONL (default: builtin held-out split "
                   "or a share of --data)")
    p.add_argument("--out", required=True, metavar="RUN", help="output run dir (re-run the same command to resume)")
    p.add_argument("--config", metavar="FILE", help="TOML recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. train.max_steps=100 (repeatable)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank; 0 = full fine-tuning (default)")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapter input (default 0)")
    p.add_argument("--lora-targets", metavar="NAMES", help="comma-separated projections "
                   "(default q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    p.add_argument("--qlora-bits", type=int, choices=[4, 8], help="QLoRA: quantize the frozen base to INT4/INT8")
    p.add_argument("--strict", action="store_true", help="a bad data row is an error (default: report and skip)")


def _overrides(args, section: str) -> list[str]:
    import json

    items = []
    if args.data:
        items.append(f"{section}.data={json.dumps(args.data)}")
    if args.val_data:
        items.append(f"{section}.val_data={json.dumps(args.val_data)}")
    if args.strict:
        items.append(f"{section}.strict=true")
    for flag, key in (("lora_alpha", "alpha"), ("lora_dropout", "dropout"), ("qlora_bits", "qlora_bits")):
        if getattr(args, flag) is not None:
            items.append(f"lora.{key}={getattr(args, flag)}")
    if args.lora_targets:
        items.append(f"lora.target_modules={json.dumps(args.lora_targets.split(','))}")
    return items


def _run_sft(args) -> int:
    from scratchlm.posttrain.pipeline import run_sft, stage_config

    items = _overrides(args, "sft")
    if args.padding:
        items.append("sft.packing=false")
    config = stage_config("sft", args.config, items + args.overrides, lora_rank=args.lora_rank)
    result = run_sft(args.model, args.out, config)
    _summary(args.out, result)
    return 0


def _run_dpo(args) -> int:
    from scratchlm.posttrain.pipeline import run_dpo, stage_config

    items = _overrides(args, "dpo")
    for flag, key in (("beta", "beta"), ("loss", "loss_type"), ("label_smoothing", "label_smoothing")):
        if getattr(args, flag) is not None:
            items.append(f"dpo.{key}={getattr(args, flag)}")
    config = stage_config("dpo", args.config, items + args.overrides, lora_rank=args.lora_rank)
    result = run_dpo(args.model, args.out, config)
    _summary(args.out, result)
    return 0


def _summary(out, result) -> None:
    import sys

    evals = ", ".join(f"{k}={v:.4g}" for k, v in result.last_eval.items())
    print(f"{out}: step {result.step}, stopped by {result.stopped}" + (f"; {evals}" if evals else ""),
          file=sys.stderr)
