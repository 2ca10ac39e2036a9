"""The `scratchlm pretrain` verb: a thin layer over `scratchlm.train.pretrain.pretrain`.

    scratchlm pretrain --data DIR --out RUN [--config FILE] [--set section.key=value ...]

Re-running the same command on the same RUN resumes from its latest valid checkpoint. SIGINT or
SIGTERM saves a checkpoint and exits with 128 + the signal number. Not for logic.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a model on a dataset dir (resumes if RUN has checkpoints)",
        description="Pretrain a decoder-only Transformer by next-token prediction. Config: "
        "defaults < --config recipe < --set overrides. Re-run on the same --out to resume.",
    )
    p.add_argument("--data", required=True, help="dataset dir made by `scratchlm data prepare`")
    p.add_argument("--out", required=True, help="run dir to write (or resume)")
    p.add_argument("--config", help="TOML recipe: a path, or a name in configs/ (e.g. gpt2-mini-cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   nargs="+", help="override a config value, e.g. --set train.max_steps=100 model.n_layer=4")
    p.add_argument("--tokenizer", help="tokenizer dir (default: DATA/tokenizer)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    import json

    from scratchlm.config import load_config

    overrides = [item for group in args.overrides for item in group]
    config = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0

    from scratchlm.train.pretrain import pretrain

    result = pretrain(args.data, args.out, config, tokenizer_dir=args.tokenizer)
    summary = f"step {result.step}, {result.tokens:,} tokens"
    if result.last_loss is not None:
        summary += f", loss {result.last_loss:.4f}"
    for key in ("val_loss", "val_bpb"):
        if key in result.last_eval:
            summary += f", {key} {result.last_eval[key]:.4f}"
    if result.stopped == "signal":
        print(f"scratchlm: stopped by signal at {summary}; checkpoint saved, re-run to resume",
              file=sys.stderr)
        return 128 + int(result.signal or 2)
    print(f"scratchlm: pretrain done ({result.stopped}): {summary} -> {args.out}", file=sys.stderr)
    return 0
