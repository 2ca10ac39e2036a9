"""The dataset directory format: token shards plus `index.json`, written and verified here.

A dataset dir holds, per split (`train`, `val`), a stream of token ids cut into shard files
`{split}_{n:06d}.bin` of raw little-endian `uint16` (vocab <= 65,536) or `uint32`. Each document
is preceded by the tokenizer's `eot_id`, so a split reads `EOT doc EOT doc ...`; a document may
continue from one shard into the next (the shards of a split are one stream, cut at a fixed size).
`index.json` is written last, atomically: a directory without it is never a dataset.

This module is for the file format: `ShardWriter` (streaming, atomic shard files with checksums),
`Dataset.open` (reads and verifies a dataset), and `prepare_dataset` (the whole pipeline, which
lives in `scratchlm.data.pipeline`). Not for cleaning or batching (see filters, dedup, loader).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from scratchlm.errors import UserError
from scratchlm.files import read_json, sha256_file

INDEX_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
SHARD_PATTERN = re.compile(r"^(train|val)_\d{6}\.bin$")
# Where the end-of-text token sits relative to each document (recorded in index.json).
EOT_LAYOUT = "before_each_doc"


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def numpy_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise UserError(f"index.json: field 'dtype' must be uint16 or uint32, got {name!r}")
    return np.dtype(name).newbyteorder("<")


def shard_name(split: str, number: int) -> str:
    return f"{split}_{number:06d}.bin"


class ShardWriter:
    """Appends token arrays to one split's shards, closing a shard each time it is full.

    Each shard is written under a temporary name, hashed as it is written, fsynced and renamed
    into place when complete, so a shard file on disk is always whole. `records` describes the
    finished shards in the form `index.json` lists them.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: str, shard_tokens: int,
                 eot_id: int):
        if shard_tokens < 1:
            raise UserError(f"shard size must be at least 1 token, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = numpy_dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.eot_id = int(eot_id)
        self.records: list[dict] = []
        self.tokens = 0
        self.docs = 0
        self._file = None
        self._tmp_path: Path | None = None
        self._hash = None
        self._in_shard = 0
        self._docs_in_shard = 0

    def add_document(self, ids) -> None:
        """Write one document: the end-of-text token, then its ids."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype.name}")
        doc = np.empty(ids.size + 1, dtype=self.dtype)
        doc[0] = self.eot_id
        doc[1:] = ids
        self.docs += 1
        self._write(doc)

    def _write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None:
                self._open_shard()
            room = self.shard_tokens - self._in_shard
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += part.size
            self._docs_in_shard += int(np.count_nonzero(part == self.eot_id))
            self.tokens += part.size
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _open_shard(self) -> None:
        name = shard_name(self.split, len(self.records))
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self._docs_in_shard = 0

    def _close_shard(self) -> None:
        name = shard_name(self.split, len(self.records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self.out_dir / name)
        self.records.append({
            "file": name, "split": self.split, "tokens": self._in_shard,
            "docs": self._docs_in_shard, "sha256": self._hash.hexdigest(),
        })
        self._file = None

    def close(self) -> list[dict]:
        """Finish the last, partly filled shard; returns the shard records."""
        if self._file is not None:
            self._close_shard()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (after an error or interrupt)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass


def remove_dataset_files(out_dir: Path) -> None:
    """Delete what an earlier (possibly interrupted) run left: index first, then shards."""
    index = out_dir / INDEX_NAME
    if index.exists():
        index.unlink()
    for path in out_dir.iterdir():
        name = path.name
        stale_tmp = name.startswith(".") and name.endswith(".tmp")
        if path.is_file() and (SHARD_PATTERN.match(name) or stale_tmp):
            path.unlink()


@dataclass
class Dataset:
    """A verified dataset directory: its index and memory-mapped shards, per split."""

    path: Path
    index: dict

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Dataset":
        """Open a dataset dir; checks the index, every shard's size and (with verify) its sha256."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"dataset directory not found: {path}")
        if not (path / INDEX_NAME).is_file():
            raise UserError(
                f"{path} is not a complete dataset (no {INDEX_NAME}; was `data prepare` "
                "interrupted?)")
        index = read_json(path / INDEX_NAME, "dataset index")
        _check_index(index, path / INDEX_NAME)
        dataset = cls(path, index)
        for record in index["shards"]:
            dataset._check_shard(record, verify)
        return dataset

    # -- what the index says -------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.index["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.index["eot_id"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.index["tokenizer_sha256"]

    def shard_records(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return [r for r in self.index["shards"] if r["split"] == split]

    def num_tokens(self, split: str) -> int:
        return sum(int(r["tokens"]) for r in self.shard_records(split))

    def num_docs(self, split: str) -> int:
        return sum(int(r["docs"]) for r in self.shard_records(split))

    # -- reading --------------------------------------------------------------------------
    def shard_arrays(self, split: str) -> list[np.memmap]:
        """Read-only memory maps of a split's shards, in stream order."""
        return [np.memmap(self.path / r["file"], dtype=self.dtype, mode="r")
                for r in self.shard_records(split) if int(r["tokens"]) > 0]

    def tokens(self, split: str) -> np.ndarray:
        """A split's whole token stream in memory (for small datasets and tests)."""
        arrays = self.shard_arrays(split)
        return np.concatenate(arrays) if arrays else np.empty(0, dtype=self.dtype)

    def iter_documents(self, split: str) -> Iterator[np.ndarray]:
        """Each document's ids (without the end-of-text token), in the order they were written."""
        stream = self.tokens(split)
        starts = np.flatnonzero(stream == self.eot_id)
        ends = np.append(starts[1:], stream.size)
        for start, end in zip(starts, ends):
            yield stream[start + 1:end]

    def verify_tokenizer(self, fingerprint: str, vocab_size: int) -> None:
        """Refuse a model/tokenizer that did not produce these ids (see the loader's method)."""
        verify_tokenizer_match(self.index, fingerprint, vocab_size, self.path)

    # -- checks ---------------------------------------------------------------------------
    def _check_shard(self, record: dict, verify: bool) -> None:
        shard = self.path / record["file"]
        if not shard.is_file():
            raise UserError(f"dataset {self.path}: shard {record['file']} is missing")
        expected = int(record["tokens"]) * self.dtype.itemsize
        actual = shard.stat().st_size
        if actual != expected:
            raise UserError(f"dataset {self.path}: shard {record['file']} has {actual} bytes, "
                            f"index says {expected} (truncated or corrupted)")
        if verify and sha256_file(shard) != record["sha256"]:
            raise UserError(f"dataset {self.path}: shard {record['file']} fails its sha256 "
                            "checksum (corrupted); re-run `scratchlm data prepare`")


_REQUIRED_FIELDS = {"version": int, "dtype": str, "vocab_size": int, "eot_id": int,
                    "tokenizer_sha256": str, "shards": list}
_SHARD_FIELDS = {"file": str, "split": str, "tokens": int, "docs": int, "sha256": str}


def _check_index(index, where: Path) -> None:
    if not isinstance(index, dict):
        raise UserError(f"{where}: expected a JSON object")
    for name, kind in _REQUIRED_FIELDS.items():
        if not isinstance(index.get(name), kind):
            raise UserError(f"{where}: field {name!r} missing or not a {kind.__name__}")
    if index["version"] != INDEX_VERSION:
        raise UserError(f"{where}: version {index['version']} is not supported "
                        f"(this scratchlm reads version {INDEX_VERSION})")
    numpy_dtype(index["dtype"])
    for i, record in enumerate(index["shards"]):
        for name, kind in _SHARD_FIELDS.items():
            if not isinstance(record, dict) or not isinstance(record.get(name), kind):
                raise UserError(f"{where}: shards[{i}]: field {name!r} missing or wrong type")
        if record["split"] not in SPLITS or not SHARD_PATTERN.match(record["file"]):
            raise UserError(f"{where}: shards[{i}]: bad split or file name {record['file']!r}")


def verify_tokenizer_match(index: dict, fingerprint: str, vocab_size: int, where) -> None:
    """Refuse ids from another tokenizer: the fingerprint must match, the vocab must cover them.

    A model may pad its embedding table beyond the tokenizer's vocabulary (to a multiple of 64,
    say), so a larger `vocab_size` is accepted; a smaller one would index out of range.
    """
    if fingerprint != index["tokenizer_sha256"]:
        raise UserError(
            f"dataset {where} was tokenized with tokenizer {index['tokenizer_sha256'][:12]}..., "
            f"not {str(fingerprint)[:12]}...; re-run `scratchlm data prepare` with this tokenizer")
    if int(vocab_size) < int(index["vocab_size"]):
        raise UserError(f"dataset {where} has vocab_size {index['vocab_size']}, larger than the "
                        f"model's {vocab_size}")


def write_dataset(out_dir: str | os.PathLike, docs: dict[str, list], *, vocab_size: int,
                  eot_id: int, tokenizer_sha256: str, shard_tokens: int = 1 << 24,
                  extra: dict | None = None) -> Dataset:
    """Write already tokenized documents (`{"train": [ids, ...], "val": [...]}`) as a dataset.

    For tests and tools that make token streams without text (synthetic data, conversions);
    text goes through `prepare_dataset`.
    """
    from scratchlm.files import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dataset_files(out_dir)
    dtype = dtype_for_vocab(vocab_size)
    shards, splits = [], {}
    for split in SPLITS:
        writer = ShardWriter(out_dir, split, dtype, shard_tokens, eot_id)
        for ids in docs.get(split, []):
            writer.add_document(ids)
        shards += writer.close()
        splits[split] = {"tokens": writer.tokens, "docs": writer.docs, "shards": len(writer.records)}
    index = {"version": INDEX_VERSION, "dtype": dtype, "vocab_size": int(vocab_size),
             "eot_id": int(eot_id), "tokenizer_sha256": tokenizer_sha256, "eot": EOT_LAYOUT,
             "shards": shards, "splits": splits, "sources": [], "stats": {}, **(extra or {})}
    atomic_write_json(out_dir / INDEX_NAME, index)
    return Dataset.open(out_dir, verify=False)


def prepare_dataset(*args, **kwargs) -> Dataset:
    """Build a dataset dir from text sources; see `scratchlm.data.pipeline.prepare_dataset`."""
    from scratchlm.data.pipeline import prepare_dataset as run_pipeline

    return run_pipeline(*args, **kwargs)
