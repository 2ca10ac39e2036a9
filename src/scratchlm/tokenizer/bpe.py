"""Byte-level BPE tokenizer: training, encoding, decoding, and its `tokenizer.json`.

Ids 0-255 are the 256 single bytes (id = byte value), ids from 256 are merged tokens in the
order they were learned, and special tokens come after the whole vocabulary. Text is first
split into chunks by a regex (`patterns.py`); merges never cross a chunk boundary. The hot
loops live in `merging.py` (Python reference + optional C extension).

Special tokens: `encode(text)` treats a special token's string as plain text, so a user cannot
inject control tokens; `allowed_special="all"` or a set of strings parses them.

Lone surrogates (e.g. "\\ud800", which Python strings can hold but UTF-8 cannot) are encoded
with the `surrogatepass` error handler, as the three bytes UTF-8 would use for that code point:
`decode_bytes(encode(s)).decode("utf-8", "surrogatepass") == s` always holds, while `decode`
replaces those bytes with U+FFFD as it does any invalid UTF-8. Not for WordPiece
(`wordpiece.py`) or other libraries' formats (`formats.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import regex

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_text, read_json, sha256_bytes
from scratchlm.tokenizer import formats
from scratchlm.tokenizer.counting import count_chunks, default_workers
from scratchlm.tokenizer.merging import ChunkEncoder, learn_merges
from scratchlm.tokenizer.patterns import fast_mode, resolve_pattern, split_text

EOT = "<|endoftext|>"
FORMAT_VERSION = 1
MAX_VOCAB = 1 << 22  # ids must fit comfortably in uint32 shards


class BPETokenizer:
    """A trained byte-level BPE tokenizer (see the module docstring for the id layout)."""

    def __init__(self, vocab: Sequence[bytes], pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None, merges=None):
        self.vocab: list[bytes] = list(vocab)
        self.pattern = resolve_pattern(pattern)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        # The learned (left, right, new id) merges, kept for inspection; encoding needs only
        # the vocabulary (see merging.py).
        self.merges: list[tuple[int, int, int]] = [tuple(m) for m in (merges or [])]
        self._check()
        self._encoder = ChunkEncoder(self.vocab)
        # Split and encode in one C call when both the extension and a named pattern allow it.
        self._fast_mode = fast_mode(self.pattern) if self._encoder._native is not None else 0
        self._special_re_cache: dict[frozenset, regex.Pattern] = {}
        self._fingerprint: str | None = None
        self._worker_pool = None  # (workers, fingerprint, pool) of encode_batch, see parallel.py

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = "gpt4",
              special_tokens: Sequence[str] = (EOT,), max_bytes: int | None = None,
              workers: int | None = None, progress: bool = True) -> "BPETokenizer":
        """Learn a vocabulary of `vocab_size` ids (specials included) from `texts`."""
        special_tokens = list(dict.fromkeys(special_tokens))
        n_merged = vocab_size - len(special_tokens)
        if vocab_size > MAX_VOCAB:
            raise UserError(f"vocab_size {vocab_size} is too large (at most {MAX_VOCAB})")
        if n_merged < 256:
            raise UserError(f"vocab_size {vocab_size} is too small: it must be at least 256 "
                            f"bytes + {len(special_tokens)} special tokens = {256 + len(special_tokens)}")
        if max_bytes is not None and max_bytes <= 0:
            raise UserError(f"max_bytes must be positive, got {max_bytes}")
        pattern_str = resolve_pattern(pattern)
        counts, n_bytes = count_chunks(texts, pattern_str, max_bytes, workers, progress)
        if n_bytes == 0 or not counts:
            raise UserError("the training corpus is empty: no text to learn from")
        words = [chunk.encode("utf-8", "surrogatepass") for chunk in counts]
        vocab, merges = learn_merges(words, list(counts.values()), n_merged,
                                     _merge_progress(n_merged, progress))
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        tok = cls(vocab, pattern_str, specials, merges)
        tok.training_bytes = n_bytes
        return tok

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (= 1 + the largest id)."""
        return max([len(self.vocab) - 1, *self.special_tokens.values()]) + 1

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT)

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self.vocab):
            return self.vocab[token_id]
        for s, i in self.special_tokens.items():
            if i == token_id:
                return s.encode("utf-8")
        raise ValueError(f"token id {token_id} is out of range (vocab_size {self.vocab_size})")

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Give each new special token the next free id; returns the ids of all of `tokens`."""
        for s in tokens:
            if not isinstance(s, str) or not s:
                raise UserError(f"special token must be a non-empty string, got {s!r}")
            if s not in self.special_tokens:
                self.special_tokens[s] = self.vocab_size
        self._special_re_cache.clear()
        self._fingerprint = None
        return [self.special_tokens[s] for s in tokens]

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Token ids of `text`; special-token strings are plain text unless allowed."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        special_re = self._special_regex(allowed_special)
        if special_re is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in special_re.finditer(text):
            ids.extend(self._encode_ordinary(text[start : m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encode_ordinary(text)

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        if self._fast_mode:
            return self._encoder._native.encode_text(text, self._fast_mode)
        return self._encoder.encode_chunks(split_text(text, self.pattern))

    def _special_regex(self, allowed_special) -> regex.Pattern | None:
        if allowed_special == "all":
            allowed = frozenset(self.special_tokens)
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise UserError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        if not allowed:
            return None
        if allowed not in self._special_re_cache:
            # Longest first, so a special token that contains another one wins.
            alternatives = sorted(allowed, key=len, reverse=True)
            self._special_re_cache[allowed] = regex.compile("|".join(map(regex.escape, alternatives)))
        return self._special_re_cache[allowed]

    def encode_batch(self, texts: Sequence[str], allowed_special: str | Iterable[str] = (),
                     workers: int | None = None) -> list[list[int]]:
        """`[encode(t) for t in texts]`, spread over `workers` processes (default: all cores)."""
        from scratchlm.tokenizer.parallel import encode_batch

        texts = list(texts)
        allowed = allowed_special if allowed_special == "all" else tuple(allowed_special)
        return encode_batch(self, texts, allowed, default_workers() if workers is None else workers)

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for."""
        vocab = self.vocab
        n = len(vocab)
        try:
            return b"".join([vocab[i] if 0 <= i < n else self.token_bytes(i) for i in ids])
        except TypeError:
            raise TypeError("decode expects a sequence of int ids") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict:
        return {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "vocab": [formats.bytes_to_text(b) for b in self.vocab],
            "merges": [list(m) for m in self.merges],
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json content: equal fingerprints, equal encoding."""
        if self._fingerprint is None:
            canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False)
            self._fingerprint = sha256_bytes(canonical.encode("utf-8"))
        return self._fingerprint

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        atomic_write_text(path, readable_json(self.to_json()))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BPETokenizer":
        path = _tokenizer_path(directory)
        return cls.from_json(read_json(path, "tokenizer file"), str(path))

    @classmethod
    def from_json(cls, data, where: str = "tokenizer.json") -> "BPETokenizer":
        parts = _parts_from_json(data, where)
        try:
            return cls(*parts)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None

    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Write a HF `tokenizers` tokenizer.json that gives ids identical to ours."""
        eot = EOT if EOT in self.special_tokens else None
        return formats.export_hf_bpe(directory, self.vocab, self.pattern, self.special_tokens, eot)

    def to_tiktoken(self, name: str = "scratchlm"):
        """A `tiktoken.Encoding` that gives ids identical to ours (built offline)."""
        return formats.to_tiktoken(self.vocab, self.pattern, self.special_tokens, name)

    # ------------------------------------------------------------------ checks

    def _check(self) -> None:
        """Reject a vocabulary this class cannot encode with (ValueError names the field)."""
        if len(self.vocab) < 256 or any(self.vocab[i] != bytes([i]) for i in range(256)):
            raise ValueError("field 'vocab' must start with the 256 single bytes in order")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("field 'vocab' has two tokens with the same bytes")
        ids = list(self.special_tokens.values())
        if len(set(ids)) != len(ids) or any(i < len(self.vocab) for i in ids):
            raise ValueError("field 'special_tokens' ids must be distinct and after the vocab")
        if any(not s for s in self.special_tokens):
            raise ValueError("field 'special_tokens' has an empty token")

    def __getstate__(self) -> dict:
        # Pickle as the JSON form: the C encoder and the worker pool cannot cross processes.
        return self.to_json()

    def __setstate__(self, state: dict) -> None:
        self.__init__(*_parts_from_json(state, "pickled tokenizer"))

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r}, "
                f"special_tokens={len(self.special_tokens)})")


def readable_json(obj: dict) -> str:
    """JSON with one top-level field, and one list element (token, merge), per line."""
    def dump(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    fields = []
    for key, value in obj.items():
        if isinstance(value, list) and value:
            body = ",\n".join(f"  {dump(v)}" for v in value)
            fields.append(f" {dump(key)}: [\n{body}\n ]")
        else:
            fields.append(f" {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _parts_from_json(data, where: str) -> tuple:
    """(vocab, pattern, special_tokens, merges) from tokenizer.json content, checked field by field."""
    if not isinstance(data, dict) or data.get("type") != "bpe":
        raise UserError(f"{where}: not a BPE tokenizer (field 'type' must be \"bpe\")")
    if data.get("version") != FORMAT_VERSION:
        raise UserError(f"{where}: unsupported field 'version' {data.get('version')!r}")
    vocab_json = data.get("vocab")
    if not isinstance(vocab_json, list) or not all(isinstance(t, str) for t in vocab_json):
        raise UserError(f"{where}: field 'vocab' must be a list of strings")
    vocab = [formats.text_to_bytes(t, f"{where}: vocab[{i}]") for i, t in enumerate(vocab_json)]
    pattern = data.get("pattern")
    if not isinstance(pattern, str):
        raise UserError(f"{where}: field 'pattern' must be a string")
    specials = data.get("special_tokens", {})
    if not isinstance(specials, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
        raise UserError(f"{where}: field 'special_tokens' must map strings to int ids")
    merges = data.get("merges", [])
    if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 3 and all(isinstance(x, int) for x in m)
            for m in merges):
        raise UserError(f"{where}: field 'merges' must be a list of [left, right, id]")
    return vocab, pattern, specials, merges


def _tokenizer_path(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if path.is_dir() or path.name != "tokenizer.json":
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    return path


def _merge_progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=256, desc="learning merges", unit="tok", leave=False)

    def update(vocab_len: int) -> None:
        bar.update(vocab_len - bar.n)
        if vocab_len >= total:
            bar.close()

    return update
