"""Decontamination: find training documents that share a long word n-gram with evaluation data.

Every record of the given evaluation files (JSONL: all string values of a record, joined in
order; other text files: the whole file) is cut into word n-grams (13 by default, lower-cased
`\\w+` words, as GPT-3 did). A training document that contains any of those n-grams is
contaminated and is dropped or only reported. Records shorter than n words cannot be checked;
their number is reported. Not for near-duplicates inside the training data (see `dedup.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from scratchlm.data.dedup import WORD, ngram_hashes, word_hashes
from scratchlm.data.sources import JSONL_SUFFIXES, resolve_files
from scratchlm.errors import UserError

DEFAULT_NGRAM = 13


def _string_leaves(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _string_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _string_leaves(item)


def _eval_records(path: Path) -> Iterable[str]:
    if path.suffix.lower() not in JSONL_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: evaluation record is not valid JSON ({e.msg})") from None
            yield " ".join(_string_leaves(record))


def _eval_files(spec: str) -> list[Path]:
    """A named file as given; from a directory or glob only the JSONL files (not READMEs)."""
    files = resolve_files(spec)
    if Path(spec).is_file():
        return files
    jsonl = [p for p in files if p.suffix.lower() in JSONL_SUFFIXES]
    if not jsonl:
        raise UserError(f"no .jsonl evaluation files in {spec!r}")
    return jsonl


@dataclass
class ContaminationIndex:
    """Sorted n-gram hashes of evaluation data, each tagged with the file it came from."""

    ngram: int
    files: list[str]
    hashes: np.ndarray  # uint64, sorted
    owners: np.ndarray  # int32, index into files, parallel to hashes
    records: dict[str, int] = field(default_factory=dict)
    too_short: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_files(cls, specs: Iterable[str], ngram: int = DEFAULT_NGRAM) -> "ContaminationIndex":
        files: list[str] = []
        parts, owners = [], []
        records: dict[str, int] = {}
        too_short: dict[str, int] = {}
        for spec in specs:
            for path in _eval_files(str(spec)):
                name = str(path)
                if name in records:
                    continue
                files.append(name)
                records[name] = too_short[name] = 0
                for text in _eval_records(path):
                    records[name] += 1
                    grams = ngram_hashes(word_hashes(text), ngram)
                    if grams.size == 0:
                        too_short[name] += 1
                        continue
                    parts.append(grams)
                    owners.append(np.full(grams.size, len(files) - 1, dtype=np.int32))
        if not files:
            raise UserError("no evaluation files given for decontamination")
        hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        owner = np.concatenate(owners) if owners else np.empty(0, dtype=np.int32)
        order = np.argsort(hashes, kind="stable")
        return cls(ngram, files, hashes[order], owner[order], records, too_short)

    def find(self, text: str) -> int:
        """Index of the evaluation file a text shares an n-gram with, or -1."""
        match = self.match(text)
        return -1 if match is None else match[0]

    def match(self, text: str) -> tuple[int, str] | None:
        """(evaluation file index, the first shared n-gram's words) or None."""
        if self.hashes.size == 0:
            return None
        grams = ngram_hashes(word_hashes(text), self.ngram)
        if grams.size == 0:
            return None
        where = np.searchsorted(self.hashes, grams)
        where[where == self.hashes.size] = 0
        hits = np.flatnonzero(self.hashes[where] == grams)
        if not hits.size:
            return None
        words = WORD.findall(text.lower())
        return int(self.owners[where[hits[0]]]), " ".join(words[hits[0]:hits[0] + self.ngram])

    def summary(self) -> dict:
        return {"ngram": self.ngram, "files": self.files, "records": self.records,
                "records_too_short": self.too_short, "ngrams": int(self.hashes.size)}
