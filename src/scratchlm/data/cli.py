"""`scratchlm data prepare|stats|sample`: a thin layer over `scratchlm.data`.

Handlers parse arguments, call `prepare_dataset`, `Dataset.open` and the `report` functions,
and print. Not for logic: everything here is callable from Python through those modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect token datasets")
    verbs = parser.add_subparsers(dest="data_verb", metavar="VERB", required=True)

    prepare = verbs.add_parser(
        "prepare", help="clean, deduplicate and tokenize text into a sharded dataset")
    prepare.add_argument("--input", nargs="+", required=True, metavar="SRC",
                         help="sources: .txt/.jsonl/.parquet files, directories, globs, "
                              "builtin:NAME, hf:NAME[:CONFIG][:SPLIT]")
    prepare.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                         help="one weight per input: mix sources in these proportions")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer directory")
    prepare.add_argument("--out", required=True, help="dataset directory to write")
    prepare.add_argument("--dedup", choices=["none", "exact", "minhash"], default="exact")
    prepare.add_argument("--filters", default="default",
                         help="default, none, or a .json/.toml file of filter thresholds")
    prepare.add_argument("--minhash", default=None, metavar="NGRAM,BANDS,ROWS,THRESHOLD",
                         help="MinHash settings (default 5,32,4,0.5)")
    prepare.add_argument("--val-fraction", type=float, default=0.01)
    prepare.add_argument("--shard-tokens", type=int, default=1 << 24)
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    prepare.add_argument("--decontaminate", nargs="+", default=[], metavar="FILES",
                         help="evaluation files; training documents sharing a 13-gram with them "
                              "are dropped")
    prepare.add_argument("--decontaminate-mode", choices=["drop", "report"], default="drop")
    prepare.add_argument("--decontaminate-ngram", type=int, default=13)
    prepare.add_argument("--removed-dir", default=None,
                         help="write every removed document here, one JSONL file per stage")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prepare.add_argument("--text-field", default="text", help="JSONL/Parquet field with the text")
    prepare.add_argument("--strict", action="store_true", help="stop at a malformed record")
    prepare.add_argument("--force", action="store_true",
                         help="rebuild even if an identical complete dataset is there")
    prepare.set_defaults(func=cmd_prepare)

    stats = verbs.add_parser("stats", help="print a dataset's statistics as JSON")
    stats.add_argument("dir", help="dataset directory")
    stats.set_defaults(func=cmd_stats)

    sample = verbs.add_parser("sample", help="decode a few windows the model will read")
    sample.add_argument("dir", help="dataset directory")
    sample.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the copy inside the dataset)")
    sample.add_argument("-n", "--count", type=int, default=3)
    sample.add_argument("--seq-len", type=int, default=64)
    sample.add_argument("--split", choices=["train", "val"], default="train")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)


def _filters(choice: str):
    if choice in ("default", "none"):
        return choice
    from scratchlm.errors import UserError

    path = Path(choice)
    if not path.is_file():
        raise UserError(f"--filters must be default, none or a settings file; not found: {choice}")
    if path.suffix == ".toml":
        import tomllib

        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        values = values.get("filters", values)
    else:
        from scratchlm.files import read_json

        values = read_json(path, "filter settings")
    from scratchlm.data.filters import FilterConfig

    return FilterConfig.from_dict(values, str(path))


def _minhash(text: str | None):
    if text is None:
        return None
    from scratchlm.data.dedup import MinHashConfig
    from scratchlm.errors import UserError

    parts = text.split(",")
    try:
        ngram, bands, rows = (int(p) for p in parts[:3])
        threshold = float(parts[3]) if len(parts) > 3 else 0.5
    except ValueError:
        raise UserError(f"--minhash expects NGRAM,BANDS,ROWS[,THRESHOLD], got {text!r}") from None
    return MinHashConfig(ngram=ngram, bands=bands, rows=rows, threshold=threshold)


def cmd_prepare(args: argparse.Namespace) -> int:
    from scratchlm.data.report import summary_table
    from scratchlm.data.shards import prepare_dataset

    dataset = prepare_dataset(
        args.input, args.tokenizer, args.out, weights=args.weights, dedup=args.dedup,
        filters=_filters(args.filters), minhash=_minhash(args.minhash),
        decontaminate=args.decontaminate, decontaminate_mode=args.decontaminate_mode,
        decontaminate_ngram=args.decontaminate_ngram, val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens, workers=args.workers, seed=args.seed,
        text_field=args.text_field, strict=args.strict, removed_dir=args.removed_dir,
        force=args.force, progress=True)
    print(summary_table(dataset.index))
    print(f"wrote {dataset.path}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from scratchlm.data.report import dataset_stats
    from scratchlm.data.shards import Dataset

    json.dump(dataset_stats(Dataset.open(args.dir)), sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from scratchlm.data.report import sample_windows
    from scratchlm.data.shards import Dataset
    from scratchlm.tokenizer import load_tokenizer

    dataset = Dataset.open(args.dir)
    tokenizer = load_tokenizer(args.tokenizer or Path(args.dir) / "tokenizer")
    windows = sample_windows(dataset, tokenizer, args.count, args.seq_len, args.split, args.seed)
    for i, text in enumerate(windows):
        print(f"--- window {i} ({args.split}, {args.seq_len} tokens) ---")
        print(text)
    return 0
