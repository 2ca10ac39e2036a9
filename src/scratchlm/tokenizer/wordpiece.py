"""WordPiece tokenizer (BERT-style): `##` continuation pieces, greedy longest match, `[UNK]`.

Text is cut into words at Unicode whitespace, and every punctuation or symbol character is a
word of its own. A word is encoded greedily: the longest vocabulary entry that starts it, then
the longest `##`-prefixed entry that continues it, and so on; a word that cannot be covered (or
is longer than `max_word_chars`) becomes one `[UNK]`. Training starts from every character
seen and repeatedly merges the adjacent pair with the best likelihood score
count(ab) / (count(a) * count(b)) (ties: the higher count, then the smaller pair of strings).
No lowercasing or accent stripping: text is taken as it is. Special-token strings in the text
are plain text. Not for byte-level BPE (`bpe.py`); training is plain Python and meant for
modest vocabularies.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import regex

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_json, read_json, sha256_bytes

PREFIX = "##"
UNK = "[UNK]"
DEFAULT_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
FORMAT_VERSION = 1
WHITESPACE = r"\p{White_Space}+"
PUNCTUATION = r"[\p{P}\p{S}]"
WORD_RE = regex.compile(r"[^\p{White_Space}\p{P}\p{S}]+|[\p{P}\p{S}]")


def split_words(text: str) -> list[str]:
    return WORD_RE.findall(text)


class WordPieceTokenizer:
    def __init__(self, vocab: Sequence[str], unk_token: str = UNK, max_word_chars: int = 100):
        self.vocab = list(vocab)
        self.id_of = {t: i for i, t in enumerate(self.vocab)}
        if len(self.id_of) != len(self.vocab):
            raise ValueError("field 'vocab' has duplicate entries")
        if unk_token not in self.id_of:
            raise ValueError(f"field 'unk_token' {unk_token!r} is not in the vocabulary")
        self.unk_token = unk_token
        self.max_word_chars = max_word_chars
        self._longest = max(map(len, self.vocab))
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def unk_id(self) -> int:
        return self.id_of[self.unk_token]

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = DEFAULT_SPECIALS, progress: bool = True):
        special_tokens = list(dict.fromkeys([UNK, *special_tokens]))
        words = Counter()
        for text in texts:
            words.update(split_words(text))
        if not words:
            raise UserError("the training corpus is empty: no text to learn from")
        seqs = {w: [c if i == 0 else PREFIX + c for i, c in enumerate(w)] for w in words}
        alphabet = sorted({s for seq in seqs.values() for s in seq})
        vocab = special_tokens + [s for s in alphabet if s not in special_tokens]
        if vocab_size < len(vocab):
            raise UserError(f"vocab_size {vocab_size} is too small: the special tokens and the "
                            f"{len(alphabet)} characters of the corpus need {len(vocab)}")
        _learn(seqs, words, vocab, vocab_size, progress)
        return cls(vocab)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in split_words(text):
            cached = self._cache.get(word)
            if cached is None:
                cached = self._encode_word(word)
                if len(self._cache) < 1 << 18:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _encode_word(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = min(len(word), start + self._longest)
            while end > start:
                piece = word[start:end] if start == 0 else PREFIX + word[start:end]
                if piece in self.id_of:
                    ids.append(self.id_of[piece])
                    break
                end -= 1
            if end == start:  # no entry covers this position: the whole word is unknown
                return [self.unk_id]
            start = end
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces, `##` pieces glued to the piece before (as HF's decoder)."""
        parts = []
        for n, i in enumerate(ids):
            token = self.vocab[i]
            if token.startswith(PREFIX):
                parts.append(token[len(PREFIX):])
            else:
                parts.append(token if n == 0 else " " + token)
        return "".join(parts)

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict:
        return {"type": "wordpiece", "version": FORMAT_VERSION, "unk_token": self.unk_token,
                "continuing_subword_prefix": PREFIX, "max_word_chars": self.max_word_chars,
                "vocab": self.vocab}

    @property
    def fingerprint(self) -> str:
        import json

        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return sha256_bytes(canonical.encode("utf-8"))

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        atomic_write_json(path, self.to_json(), indent=1)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "WordPieceTokenizer":
        from scratchlm.tokenizer.bpe import _tokenizer_path

        path = _tokenizer_path(directory)
        return cls.from_json(read_json(path, "tokenizer file"), str(path))

    @classmethod
    def from_json(cls, data, where: str = "tokenizer.json") -> "WordPieceTokenizer":
        if not isinstance(data, dict) or data.get("type") != "wordpiece":
            raise UserError(f"{where}: not a WordPiece tokenizer (field 'type')")
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or not vocab or not all(isinstance(t, str) and t for t in vocab):
            raise UserError(f"{where}: field 'vocab' must be a list of non-empty strings")
        max_chars = data.get("max_word_chars", 100)
        if not isinstance(max_chars, int) or max_chars < 1:
            raise UserError(f"{where}: field 'max_word_chars' must be a positive integer")
        try:
            return cls(vocab, data.get("unk_token", UNK), max_chars)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None

    def hf_json(self) -> dict:
        split_ws = {"type": "Split", "pattern": {"Regex": WHITESPACE}, "behavior": "Removed",
                    "invert": False}
        split_punct = {"type": "Split", "pattern": {"Regex": PUNCTUATION}, "behavior": "Isolated",
                       "invert": False}
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split_ws, split_punct]},
            "post_processor": None,
            "decoder": {"type": "WordPiece", "prefix": PREFIX, "cleanup": False},
            "model": {"type": "WordPiece", "unk_token": self.unk_token,
                      "continuing_subword_prefix": PREFIX,
                      "max_input_chars_per_word": self.max_word_chars,
                      "vocab": {t: i for i, t in enumerate(self.vocab)}},
        }

    def export_hf(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        atomic_write_json(out / "tokenizer.json", self.hf_json())
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": False})
        return out / "tokenizer.json"


def _learn(seqs: dict[str, list[str]], words: Counter, vocab: list[str], vocab_size: int,
           progress: bool) -> None:
    """Merge best-scoring pairs into `vocab` until it has `vocab_size` entries (in place)."""
    from tqdm import tqdm

    known = set(vocab)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    symbol_count: dict[str, int] = defaultdict(int)
    where: dict[tuple[str, str], set[str]] = defaultdict(set)
    for w, seq in seqs.items():
        _add_word(seq, words[w], w, pair_count, symbol_count, where, +1)
    bar = tqdm(total=vocab_size, initial=len(vocab), desc="learning pieces", disable=not progress,
               leave=False)
    while len(vocab) < vocab_size:
        live = [(p, c) for p, c in pair_count.items() if c > 0]
        if not live:
            break
        (a, b), _ = max(live, key=lambda pc: (pc[1] / (symbol_count[pc[0][0]] * symbol_count[pc[0][1]]),
                                              pc[1], _neg(pc[0])))
        merged = a + b[len(PREFIX):]
        for w in list(where.pop((a, b), ())):
            seq = seqs[w]
            _add_word(seq, words[w], w, pair_count, symbol_count, where, -1)
            seqs[w] = seq = _merge(seq, a, b, merged)
            _add_word(seq, words[w], w, pair_count, symbol_count, where, +1)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
            bar.update(1)
    bar.close()


def _neg(pair: tuple[str, str]):
    # max() picks the largest key; invert the strings' order so the smaller pair wins a tie.
    return tuple(tuple(-ord(c) for c in s) + (1,) for s in pair)


def _add_word(seq, count, word, pair_count, symbol_count, where, sign) -> None:
    for s in seq:
        symbol_count[s] += sign * count
    for pair in zip(seq, seq[1:]):
        pair_count[pair] += sign * count
        if sign > 0:
            where[pair].add(word)


def _merge(seq: list[str], a: str, b: str, merged: str) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out
