"""`scratchlm export` and `scratchlm import`: thin CLI verbs over `scratchlm.interop`.

    scratchlm export --model RUN --format hf|gguf --out DIR [--dtype ...]
    scratchlm import --format hf --from DIR --out RUN

Not for logic: see `scratchlm.interop.hf` and `scratchlm.interop.gguf`.
"""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    e = subparsers.add_parser("export", help="export a run to Hugging Face (transformers) or GGUF")
    e.add_argument("--model", required=True, metavar="RUN", help="run dir")
    e.add_argument("--format", required=True, choices=["hf", "gguf"])
    e.add_argument("--out", required=True, metavar="DIR", help="output dir (gguf: or a .gguf file path)")
    e.add_argument("--dtype", default=None,
                   help="hf: float32 (default) | bfloat16 | float16; gguf: as scratchlm.interop.gguf accepts")
    e.set_defaults(func=run_export)

    i = subparsers.add_parser("import", help="turn a local Hugging Face checkpoint into a run")
    i.add_argument("--format", required=True, choices=["hf"])
    i.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="dir with config.json, model.safetensors and tokenizer.json")
    i.add_argument("--out", required=True, metavar="RUN")
    i.set_defaults(func=run_import)


def run_export(args) -> int:
    if args.format == "hf":
        from scratchlm.interop.hf import export_hf

        out = export_hf(args.model, args.out, dtype=args.dtype or "float32")
    else:
        from scratchlm.interop.gguf import export_gguf

        from pathlib import Path

        # --out names a directory (the GGUF goes in as model.gguf) or a .gguf file.
        target = Path(args.out) if args.out.endswith(".gguf") else Path(args.out) / "model.gguf"
        kwargs = {"dtype": args.dtype} if args.dtype else {}
        out = export_gguf(args.model, target, **kwargs)
    print(f"exported {args.model} -> {out}", file=sys.stderr)
    return 0


def run_import(args) -> int:
    from scratchlm.interop.hf import import_hf

    out = import_hf(args.source, args.out)
    print(f"imported {args.source} -> {out}", file=sys.stderr)
    return 0
