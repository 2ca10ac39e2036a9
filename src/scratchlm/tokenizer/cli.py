"""`scratchlm tokenizer train|encode|show|stats`: a thin layer over `scratchlm.tokenizer`.

Each handler parses arguments, calls the library and prints; all logic lives in the tokenizer
modules (and `view.py` for what `show` and `stats` print). Not for anything else.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train and inspect tokenizers")
    verbs = parser.add_subparsers(dest="tokenizer_verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="train a byte-level BPE (or WordPiece) tokenizer")
    train.add_argument("--input", nargs="+", required=True, metavar="SRC",
                       help="text sources: .txt/.jsonl files, directories, globs, builtin:NAME")
    train.add_argument("--vocab-size", type=int, required=True, help="ids, specials included")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    train.add_argument("--pattern", default="gpt4",
                       help="split pattern: gpt4 (default), gpt2, none, or a custom regex")
    train.add_argument("--special", nargs="*", default=None, metavar="TOKEN",
                       help="special tokens (default: <|endoftext|>)")
    train.add_argument("--max-bytes", type=int, default=None, help="train on the first N bytes")
    train.add_argument("--text-field", default="text", help="JSONL field holding the text")
    train.add_argument("--strict", action="store_true", help="stop at a malformed JSONL line")
    train.add_argument("--workers", type=int, default=None, help="processes for counting")
    train.add_argument("--type", choices=["bpe", "wordpiece"], default="bpe")
    train.set_defaults(func=cmd_train)

    encode = verbs.add_parser("encode", help="print the ids of a text (stdin if none given)")
    encode.add_argument("--tokenizer", required=True, help="tokenizer directory")
    encode.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
    encode.add_argument("--allow-special", action="store_true",
                        help="parse special-token strings instead of treating them as text")
    encode.set_defaults(func=cmd_encode)

    show = verbs.add_parser("show", help="show token boundaries and each token's bytes")
    show.add_argument("--tokenizer", required=True, help="tokenizer directory")
    show.add_argument("text", nargs="?", help="text to show (default: read stdin)")
    show.set_defaults(func=cmd_show)

    stats = verbs.add_parser("stats", help="bytes per token and vocabulary use on a corpus")
    stats.add_argument("--tokenizer", required=True, help="tokenizer directory")
    stats.add_argument("--input", nargs="+", required=True, metavar="SRC")
    stats.add_argument("--text-field", default="text")
    stats.add_argument("--strict", action="store_true")
    stats.add_argument("--max-bytes", type=int, default=None)
    stats.set_defaults(func=cmd_stats)


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def _read_text(text: str | None) -> str:
    """The TEXT argument with \\n, \\t, \\r, \\\\ unescaped (shells make them awkward), or stdin."""
    if text is None:
        return sys.stdin.read()
    import re

    return re.sub(r"\\[ntr\\]", lambda m: _ESCAPES[m.group()], text)


def cmd_train(args: argparse.Namespace) -> int:
    from scratchlm.data.sources import SourceStats, iter_texts
    from scratchlm.tokenizer import BPETokenizer, WordPieceTokenizer
    from scratchlm.tokenizer.bpe import EOT

    stats = SourceStats()
    texts = iter_texts(args.input, text_field=args.text_field, strict=args.strict, stats=stats)
    if args.type == "wordpiece":
        specials = args.special if args.special is not None else None
        kwargs = {} if specials is None else {"special_tokens": specials}
        tok = WordPieceTokenizer.train(texts, args.vocab_size, **kwargs)
    else:
        specials = args.special if args.special is not None else [EOT]
        tok = BPETokenizer.train(texts, args.vocab_size, pattern=args.pattern,
                                 special_tokens=specials, max_bytes=args.max_bytes,
                                 workers=args.workers)
    path = tok.save(args.out)
    for problem in stats.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if stats.invalid_utf8_documents:
        print(f"warning: {stats.invalid_utf8_documents} documents had invalid UTF-8 (replaced)",
              file=sys.stderr)
    if tok.vocab_size < args.vocab_size:
        print(f"warning: the corpus ran out of pairs to merge: {tok.vocab_size} ids instead of "
              f"{args.vocab_size}", file=sys.stderr)
    print(f"wrote {path} ({tok.vocab_size} ids, fingerprint {tok.fingerprint[:12]})")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = _read_text(args.text)
    if args.allow_special and hasattr(tok, "special_tokens"):
        ids = tok.encode(text, allowed_special="all")
    else:
        ids = tok.encode(text)
    print(" ".join(map(str, ids)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer
    from scratchlm.tokenizer.view import show_tokens

    tok = load_tokenizer(args.tokenizer)
    print(show_tokens(tok, _read_text(args.text)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from scratchlm.data.sources import iter_texts
    from scratchlm.tokenizer import load_tokenizer
    from scratchlm.tokenizer.view import corpus_stats, format_stats

    tok = load_tokenizer(args.tokenizer)
    texts = iter_texts(args.input, text_field=args.text_field, strict=args.strict)
    print(format_stats(corpus_stats(tok, texts, max_bytes=args.max_bytes)))
    return 0
