"""`scratchlm model info`: size up a model from a recipe, a preset or a run, without building it.

Prints parameters, FLOPs per token, and the memory for weights, gradients, optimizer state and
activations at a given batch (with and without activation checkpointing). Thin: the arithmetic
is `scratchlm.model.accounting`, the config resolution `scratchlm.model.config`.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="inspect model architectures")
    verbs = model.add_subparsers(dest="model_verb", metavar="VERB")
    info = verbs.add_parser(
        "info",
        help="parameters, FLOPs per token and training memory of a model",
        description="Parameters, FLOPs per token and training memory of a model config.",
    )
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="a TOML recipe or JSON config with a model section")
    source.add_argument("--preset", metavar="NAME", help="a preset name, e.g. gpt2-124m, llama-1b")
    source.add_argument("--model", metavar="RUN", help="a run directory (reads RUN/config.json)")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a model field, e.g. --set n_layer=4 (repeatable)")
    info.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (default: recipe's or 8)")
    info.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: recipe's or max_seq_len)")
    info.add_argument("--param-dtype", default="fp32", help="dtype of weights, grads, optimizer state (default fp32)")
    info.add_argument("--compute-dtype", default=None,
                      help="dtype of activations (default: the recipe's train.dtype, else bf16)")
    info.add_argument("--optimizer", default="adamw", choices=["adamw", "muon", "sgd"])
    info.add_argument("--peak-flops", default=None, metavar="DEVICE|FLOPS",
                      help="state a peak (h100, 989e12, or cpu to measure this machine's bf16 "
                      "matmul rate) to show tokens/s at 50%% MFU")
    info.add_argument("--json", action="store_true", help="print the figures as JSON")
    info.set_defaults(func=run_info)
    model.set_defaults(func=lambda args: model.print_help())


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as JSON when it parses (numbers, true/false), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    key = key.removeprefix("model.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def load_sections(path: Path) -> dict[str, Any]:
    """The whole recipe (TOML) or config (JSON) as a dict of sections."""
    if path.suffix == ".toml":
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file is not valid TOML: {path}: {e}") from None
    from scratchlm.files import read_json

    return read_json(path, "config file")


def resolve(args) -> tuple[Any, dict[str, Any]]:
    """(ModelConfig, train section) from whichever of --config / --preset / --model was given."""
    from scratchlm.model.config import config_from_mapping

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.preset:
        return config_from_mapping({"preset": args.preset, **overrides}, "--preset"), {}
    path = Path(args.config) if args.config else Path(args.model) / "config.json"
    sections = load_sections(path)
    model_section = sections.get("model", sections) if isinstance(sections, dict) else sections
    if args.model and "model" not in sections:
        raise UserError(f"{path} has no \"model\" section")
    train = sections.get("train", {}) if isinstance(sections, dict) else {}
    return config_from_mapping({**model_section, **overrides}, str(path)), train


def run_info(args) -> int:
    from scratchlm.model import accounting

    cfg, train = resolve(args)
    batch = args.batch_size or train.get("micro_batch_size") or 8
    seq_len = args.seq_len or train.get("seq_len") or cfg.max_seq_len
    if batch <= 0 or seq_len <= 0:
        raise UserError("--batch-size and --seq-len must be positive")
    recipe_dtype = train.get("dtype") if train.get("dtype") in ("fp32", "bf16", "fp16") else None
    compute_dtype = args.compute_dtype or recipe_dtype or "bf16"
    figures = model_info(cfg, batch, seq_len, args.param_dtype, compute_dtype, args.optimizer)
    if args.peak_flops:
        peak = accounting.peak_flops(args.peak_flops)
        figures["peak_flops"] = peak
        figures["tokens_per_sec_at_50pct_mfu"] = 0.5 * peak / figures["flops_per_token"]
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(format_info(figures))
    return 0


def model_info(cfg, batch_size: int, seq_len: int, param_dtype="fp32", compute_dtype="bf16", optimizer="adamw") -> dict:
    """Every figure `model info` shows, as a JSON-ready dict."""
    from scratchlm.model import accounting

    plain = accounting.memory_estimate(cfg, batch_size, seq_len, param_dtype, compute_dtype, optimizer, False)
    ckpt = accounting.memory_estimate(cfg, batch_size, seq_len, param_dtype, compute_dtype, optimizer, True)
    return {
        "config": cfg.to_dict(),
        "parameters": accounting.num_parameters(cfg),
        "non_embedding_parameters": accounting.num_parameters(cfg, non_embedding=True),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "flops_per_token": accounting.flops_per_token(cfg, seq_len),
        "forward_flops_per_token": accounting.flops_per_token(cfg, seq_len) / 3,
        "memory": plain.to_dict(),
        "memory_with_checkpointing": ckpt.to_dict(),
        "dtypes": {"param": param_dtype, "compute": compute_dtype, "optimizer": optimizer},
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_info(f: dict) -> str:
    c = f["config"]
    heads = f"{c['n_head']} heads" + (f" / {c['n_kv_head']} kv" if c["n_kv_head"] != c["n_head"] else "")
    arch = (
        f"{c['norm']} ({c['norm_position']}), {c['positions']} positions, {c['activation']}, "
        f"{'tied' if c['tie_embeddings'] else 'untied'} embeddings{', qk-norm' if c['qk_norm'] else ''}"
    )
    lines = [
        f"model        {c.get('preset') or 'custom'}: {c['n_layer']} layers, d_model {c['d_model']}, "
        f"{heads}, d_ff {c['d_ff']}, vocab {c['vocab_size']}, max_seq_len {c['max_seq_len']}",
        f"architecture {arch}",
        f"parameters   {f['parameters']:,} ({human_count(f['parameters'])}), "
        f"non-embedding {f['non_embedding_parameters']:,}",
        f"FLOPs/token  {human_count(f['flops_per_token'])} training, "
        f"{human_count(f['forward_flops_per_token'])} forward (seq_len {f['seq_len']})",
    ]
    if "peak_flops" in f:
        lines.append(f"throughput   {f['tokens_per_sec_at_50pct_mfu']:,.0f} tokens/s at 50% MFU of "
                     f"{human_count(f['peak_flops'])}FLOP/s")
    d = f["dtypes"]
    lines.append(f"memory       batch {f['batch_size']} x {f['seq_len']} tokens, {d['param']} weights, "
                 f"{d['compute']} activations, {d['optimizer']}")
    lines.append(f"  {'':<14}{'plain':>12}{'checkpointed':>16}")
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        lines.append(f"  {key:<14}{human_bytes(f['memory'][key]):>12}"
                     f"{human_bytes(f['memory_with_checkpointing'][key]):>16}")
    return "\n".join(lines)

