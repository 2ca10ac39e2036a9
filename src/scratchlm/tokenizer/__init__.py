"""Tokenizers trained from scratch: byte-level BPE (`bpe.py`) and WordPiece (`wordpiece.py`).

`load_tokenizer(dir)` reads a `tokenizer.json` and returns the right class, dispatching on its
`type` field. Not for splitting corpora into shards (see `scratchlm.data`).
"""

from __future__ import annotations

import os

from scratchlm.errors import UserError
from scratchlm.tokenizer.bpe import EOT, BPETokenizer
from scratchlm.tokenizer.wordpiece import WordPieceTokenizer

__all__ = ["BPETokenizer", "WordPieceTokenizer", "load_tokenizer", "EOT"]

TOKENIZER_TYPES = {"bpe": BPETokenizer, "wordpiece": WordPieceTokenizer}


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved in `directory` (or at a `tokenizer.json` path), of whichever type."""
    from scratchlm.files import read_json
    from scratchlm.tokenizer.bpe import _tokenizer_path

    path = _tokenizer_path(directory)
    data = read_json(path, "tokenizer file")
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in TOKENIZER_TYPES:
        raise UserError(f"{path}: field 'type' must be one of {sorted(TOKENIZER_TYPES)}, got {kind!r}")
    return TOKENIZER_TYPES[kind].from_json(data, str(path))
