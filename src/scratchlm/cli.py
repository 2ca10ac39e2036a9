"""The `scratchlm` command: one verb per pipeline stage, each a thin layer over the library.

Every verb lives in its stage's own `cli` module, which exposes `register(subparsers)`; this
file only lists them, builds the parser and turns a `UserError` into one clear line (exit 2).
Not for logic: anything a verb does is callable from Python through the stage's module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scratchlm import __version__
from scratchlm.errors import UserError

# Stage modules that register verbs, in pipeline order. A module missing from a partial
# install is skipped so the rest of the command still works.
VERB_MODULES = [
    "scratchlm.tokenizer.cli",
    "scratchlm.data.cli",
    "scratchlm.model.cli",
    "scratchlm.train.cli",
    "scratchlm.posttrain.cli",
    "scratchlm.eval.cli",
    "scratchlm.infer.cli",
    "scratchlm.interop.cli",
    "scratchlm.deploy_cli",
    "scratchlm.speedrun",
    "scratchlm.compare",
    "scratchlm.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a language model from scratch: tokenizer -> data -> pretrain -> "
        "sft -> dpo -> eval / quantize / serve / export.",
    )
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.verb is None else 2
    try:
        result = args.func(args)
    except UserError as e:
        print(f"scratchlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
