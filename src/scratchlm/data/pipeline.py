"""`prepare_dataset`: text sources -> clean -> deduplicate -> decontaminate -> tokenize -> shards.

One streaming pass. The main process reads documents (mixing sources by weight), groups them in
chunks of about a megabyte and hands each chunk to a pool of worker processes, which normalise
the text, run the quality rules, compute the exact-dedup key, the MinHash signature and the
contamination check, and tokenize the documents that pass. The main process takes the results
back in input order, so every decision is the same for any number of workers: the first copy of
a duplicate wins, the train/validation split is decided per document from a hash of its text
and the seed, and tokens go to the shard writers as they arrive. At most `2 * workers` chunks
are in flight, so memory stays flat however large the input.

A run first deletes what an earlier run left (index first, then shards) and writes `index.json`
last, so an interrupted run leaves a directory the loader refuses, and a re-run restarts
cleanly; a re-run with identical inputs and settings over a complete dataset returns it as is.
Not for the file format itself (see `shards.py`) or for batching (see `loader.py`).
"""

from __future__ import annotations

import hashlib
import json
from array import array
import multiprocessing
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scratchlm.data.decontaminate import DEFAULT_NGRAM, ContaminationIndex
from scratchlm.data.dedup import DEDUP_MODES, LSHIndex, MinHashConfig, MinHasher, utf8_key
from scratchlm.data.filters import (FilterConfig, check_document, document_kind, filter_config,
                                    normalize_text)
from scratchlm.data.shards import (EOT_LAYOUT, INDEX_NAME, INDEX_VERSION, Dataset, ShardWriter,
                                   dtype_for_vocab, remove_dataset_files)
from scratchlm.data.sources import Document, SourceStats, input_size, iter_documents
from scratchlm.errors import UserError
from scratchlm.files import atomic_write_json, read_json

DEFAULT_SHARD_TOKENS = 1 << 24
DEFAULT_VAL_FRACTION = 0.01
CHUNK_BYTES = 1 << 18  # small enough to keep both workers busy to the end of a run
CHUNK_DOCS = 256
DECONTAMINATE_MODES = ("drop", "report")
MAX_EXAMPLES = 20


# -- mixing sources ---------------------------------------------------------------------------
@dataclass
class SourceRecord:
    """What one input source contributed; becomes an entry of `index.json`'s `sources`."""

    spec: str
    weight: float | None
    read: SourceStats = field(default_factory=SourceStats)
    docs_kept: int = 0
    bytes_kept: int = 0
    tokens: int = 0
    exhausted: bool = False

    def to_dict(self) -> dict:
        return {
            "spec": self.spec, "weight": self.weight, "docs_read": self.read.documents,
            "bytes_read": self.read.bytes, "files": self.read.files, "docs_kept": self.docs_kept,
            "bytes_kept": self.bytes_kept, "tokens": self.tokens, "exhausted": self.exhausted,
        }


def mix_sources(sources: list[SourceRecord], text_field: str, strict: bool
                ) -> Iterator[tuple[int, Document]]:
    """Documents from every source, tagged with the source's position.

    Without weights each source is read whole, one after the other. With weights the sources
    are interleaved so that the bytes read from each stay proportional to its weight (the next
    document comes from the source furthest below its share), and the mix stops when a source
    with a positive weight runs out: the largest mix with exactly those proportions that needs
    no repetition. Weight 0 leaves a source out.
    """
    streams = [iter_documents(s.spec, text_field=text_field, strict=strict, stats=s.read)
               for s in sources]
    if all(s.weight is None for s in sources):
        for i, stream in enumerate(streams):
            for doc in stream:
                yield i, doc
            sources[i].exhausted = True
        return
    active = [i for i, s in enumerate(sources) if s.weight > 0]
    while active:
        i = min(active, key=lambda k: (sources[k].read.bytes / sources[k].weight, k))
        doc = next(streams[i], None)
        if doc is None:
            sources[i].exhausted = True
            return
        yield i, doc


def _check_weights(specs: list[str], weights) -> list[float | None]:
    if weights is None:
        return [None] * len(specs)
    weights = list(weights)
    if len(weights) != len(specs):
        raise UserError(f"{len(weights)} weights given for {len(specs)} inputs; give one per input")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise UserError(f"weights must be numbers, got {weights}") from None
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise UserError(f"weights must be >= 0 with at least one > 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


# -- the work done in worker processes --------------------------------------------------------
@dataclass
class WorkerSetup:
    tokenizer: object
    filters: FilterConfig
    minhash: MinHashConfig | None
    contamination: ContaminationIndex | None


@dataclass
class ChunkResult:
    """Per document of a chunk: removal reason, byte size, key, signature, contamination match;
    and the token ids of the documents that passed the filters, concatenated."""

    reasons: list[str | None]
    sizes: list[int]
    keys: list[bytes | None]
    signatures: list[np.ndarray | None]
    contaminated: list[tuple[int, str] | None]  # (eval file index, shared n-gram)
    token_lengths: np.ndarray
    tokens: np.ndarray


_worker: WorkerSetup | None = None
_worker_minhasher: MinHasher | None = None


def _init_worker(setup: WorkerSetup) -> None:
    global _worker, _worker_minhasher
    _worker = setup
    _worker_minhasher = MinHasher(setup.minhash) if setup.minhash else None


def _process_chunk(items: list[tuple[str, str]]) -> ChunkResult:
    """Normalise, filter, hash and tokenize one chunk of (text, kind) pairs."""
    setup = _worker
    result = ChunkResult([], [], [], [], [], np.empty(0, np.int64), np.empty(0, np.uint32))
    passed = []
    for text, kind in items:
        if setup.filters.normalize:
            text = normalize_text(text)
        reason = check_document(text, kind, setup.filters)
        result.reasons.append(reason)
        encoded = text.encode("utf-8", errors="surrogatepass")
        result.sizes.append(len(encoded))
        if reason is not None:
            result.keys.append(None)
            result.signatures.append(None)
            result.contaminated.append(None)
            continue
        result.keys.append(utf8_key(encoded))
        result.signatures.append(_worker_minhasher.signature(text) if _worker_minhasher else None)
        result.contaminated.append(setup.contamination.match(text) if setup.contamination else None)
        passed.append(text)
    ids = encode_texts(setup.tokenizer, passed)
    result.token_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = array("I")  # C-speed flattening; travels back as one buffer
    for doc in ids:
        if type(doc) is list:  # ~2.5x faster than extend, which goes through the iterator
            flat.fromlist(doc)
        else:
            flat.extend(doc)
    result.tokens = np.frombuffer(flat, dtype=np.uint32) if flat else np.empty(0, np.uint32)
    return result


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text in this process (the pool around it supplies the parallelism)."""
    if not texts:
        return []
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        try:
            return list(encode_batch(texts, workers=1))
        except TypeError:  # an encode_batch without a workers argument
            return list(encode_batch(texts))
    return [tokenizer.encode(t) for t in texts]


def _chunks(docs: Iterator[tuple[int, Document]]) -> Iterator[list[tuple[int, Document]]]:
    chunk, size = [], 0
    for item in docs:
        chunk.append(item)
        size += len(item[1].text)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _run_ordered(chunks: Iterable[list], setup: WorkerSetup, workers: int
                 ) -> Iterator[tuple[list, ChunkResult]]:
    """(chunk, result) in input order; in this process for 1 worker, else a bounded pool."""
    def payload(chunk):
        return [(doc.text, document_kind(doc.id, doc.source)) for _, doc in chunk]

    if workers <= 1:
        _init_worker(setup)
        for chunk in chunks:
            yield chunk, _process_chunk(payload(chunk))
        return
    # fork: workers inherit the tokenizer and the contamination index instead of unpickling
    # them, and scripts need no `if __name__ == "__main__"` guard (as the tokenizer's own pool).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_init_worker, initargs=(setup,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_process_chunk, (payload(chunk),))))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.get()
        while pending:
            done, future = pending.popleft()
            yield done, future.get()


# -- statistics -------------------------------------------------------------------------------
class Removals:
    """Documents and bytes each stage removed, optionally with the documents in side files."""

    def __init__(self, removed_dir: str | os.PathLike | None):
        self.counts: dict[str, dict[str, int]] = {}
        self.removed_dir = Path(removed_dir) if removed_dir else None
        self._files: dict[str, tuple] = {}

    def add(self, stage: str, reason: str, doc: Document, size: int, detail: str | None = None):
        entry = self.counts.setdefault(f"{stage}.{reason}" if stage else reason,
                                       {"docs": 0, "bytes": 0})
        entry["docs"] += 1
        entry["bytes"] += size
        if self.removed_dir is not None:
            record = {"id": doc.id, "source": doc.source, "reason": reason, "text": doc.text}
            if detail:
                record["detail"] = detail
            self._file(stage or reason).write(json.dumps(record, ensure_ascii=False) + "\n")

    def _file(self, name: str):
        if name not in self._files:
            self.removed_dir.mkdir(parents=True, exist_ok=True)
            final = self.removed_dir / f"{name}.jsonl"
            tmp = self.removed_dir / f".{name}.jsonl.tmp"
            self._files[name] = (open(tmp, "w", encoding="utf-8"), tmp, final)
        return self._files[name][0]

    def close(self, keep: bool = True) -> None:
        for handle, tmp, final in self._files.values():
            handle.close()
            if keep:
                os.replace(tmp, final)
            else:
                tmp.unlink(missing_ok=True)
        self._files.clear()

    def total(self, prefix: str) -> dict[str, int]:
        picked = [v for k, v in self.counts.items() if k == prefix or k.startswith(prefix + ".")]
        return {"docs": sum(v["docs"] for v in picked), "bytes": sum(v["bytes"] for v in picked)}


# -- the pipeline -----------------------------------------------------------------------------
def prepare_dataset(
    inputs: str | Iterable[str],
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    weights: Iterable[float] | None = None,
    dedup: str = "exact",
    filters: str | dict | FilterConfig | None = "default",
    minhash: MinHashConfig | dict | None = None,
    decontaminate: Iterable[str] = (),
    decontaminate_mode: str = "drop",
    decontaminate_ngram: int = DEFAULT_NGRAM,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    strict: bool = False,
    removed_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Dataset:
    """Build the dataset dir `out_dir` from `inputs` (source specs, see `scratchlm.data.sources`).

    `tokenizer` is a tokenizer object or a tokenizer dir. `weights`: one per input, mix the
    sources in these proportions (see `mix_sources`). `dedup`: none, exact or minhash (minhash
    also removes exact copies). `filters`: default, none, a dict of thresholds or a
    FilterConfig. `decontaminate`: evaluation files whose 13-grams mark a training document
    contaminated (`decontaminate_mode` drop or report). `removed_dir`: write every removed
    document there, one JSONL file per stage. Returns the opened dataset; its `index["stats"]`
    holds the counts of every stage.
    """
    specs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(s) for s in inputs]
    if not specs:
        raise UserError("no input given")
    tokenizer = _load_tokenizer(tokenizer)
    run = PrepareRun(
        specs=specs, weights=_check_weights(specs, weights), dedup=dedup,
        filters=filter_config(filters),
        minhash=MinHashConfig.from_dict(minhash) if isinstance(minhash, dict)
        else minhash or MinHashConfig(),
        decontaminate=[str(p) for p in decontaminate], decontaminate_mode=decontaminate_mode,
        decontaminate_ngram=int(decontaminate_ngram), val_fraction=float(val_fraction),
        shard_tokens=int(shard_tokens), seed=int(seed), text_field=text_field, strict=strict)
    settings = run.settings(tokenizer)
    settings_sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    out_dir = Path(out_dir)
    if not force and _is_same_complete_dataset(out_dir, settings_sha):
        return Dataset.open(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dataset_files(out_dir)  # the index goes first: a half-written dir is never a dataset

    workers = max(1, int(workers or os.cpu_count() or 1))
    index = _stream_into_shards(run, tokenizer, out_dir, workers, removed_dir, progress)
    _save_tokenizer_copy(tokenizer, out_dir)
    index.update(settings=settings, settings_sha256=settings_sha)
    atomic_write_json(out_dir / INDEX_NAME, index)
    return Dataset.open(out_dir, verify=False)


@dataclass
class PrepareRun:
    """The checked settings of one `prepare_dataset` call."""

    specs: list[str]
    weights: list[float | None]
    dedup: str
    filters: FilterConfig
    minhash: MinHashConfig
    decontaminate: list[str]
    decontaminate_mode: str
    decontaminate_ngram: int
    val_fraction: float
    shard_tokens: int
    seed: int
    text_field: str
    strict: bool

    def __post_init__(self):
        if self.dedup not in DEDUP_MODES:
            raise UserError(f"dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if self.decontaminate_mode not in DECONTAMINATE_MODES:
            raise UserError("decontaminate mode must be drop or report, "
                            f"got {self.decontaminate_mode!r}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise UserError(f"shard size must be at least 1 token, got {self.shard_tokens}")

    def settings(self, tokenizer) -> dict:
        """Everything the result depends on; an identical re-run over a complete dir is a no-op."""
        return {
            "inputs": self.specs, "weights": self.weights, "dedup": self.dedup,
            "filters": self.filters.to_dict(),
            "minhash": self.minhash.to_dict() if self.dedup == "minhash" else None,
            "decontaminate": self.decontaminate, "decontaminate_mode": self.decontaminate_mode,
            "decontaminate_ngram": self.decontaminate_ngram, "val_fraction": self.val_fraction,
            "shard_tokens": self.shard_tokens, "seed": self.seed, "text_field": self.text_field,
            "tokenizer_sha256": tokenizer.fingerprint,
            "input_files": _input_fingerprint(self.specs + self.decontaminate),
        }


def _stream_into_shards(run: PrepareRun, tokenizer, out_dir: Path, workers: int,
                        removed_dir, progress: bool) -> dict:
    """The one pass over the inputs; returns the index (without settings) of what it wrote."""
    vocab_size, eot_id = int(tokenizer.vocab_size), int(tokenizer.eot_id)
    dtype = dtype_for_vocab(vocab_size)
    contamination = (ContaminationIndex.from_files(run.decontaminate, run.decontaminate_ngram)
                     if run.decontaminate else None)
    minhash = run.minhash if run.dedup == "minhash" else None
    setup = WorkerSetup(tokenizer, run.filters, minhash, contamination)
    sources = [SourceRecord(spec, w) for spec, w in zip(run.specs, run.weights)]
    writers = {split: ShardWriter(out_dir, split, dtype, run.shard_tokens, eot_id)
               for split in ("train", "val")}
    removals = Removals(removed_dir)
    state = _PackState(run.dedup, run.minhash, contamination, run.decontaminate_mode,
                       run.val_fraction, run.seed)
    bar = _progress_bar(run.specs, progress)
    completed = False
    try:
        docs = mix_sources(sources, run.text_field, run.strict)
        for chunk, result in _run_ordered(_chunks(docs), setup, workers):
            _pack_chunk(chunk, result, sources, writers, removals, state)
            if bar is not None:
                bar.update(sum(len(doc.text) for _, doc in chunk))
                bar.set_postfix(tokens=sum(w.tokens for w in writers.values()), refresh=False)
        shards = writers["train"].close() + writers["val"].close()
        completed = True
        if bar is not None and bar.total:
            bar.update(max(0, bar.total - bar.n))  # text bytes undercount JSON-escaped files
    finally:
        if bar is not None:
            bar.close()
        if not completed:
            for writer in writers.values():
                writer.abort()
        removals.close(keep=completed)
    if state.kept_docs == 0:
        raise UserError("no documents left to write: " + _why_empty(sources, removals))
    return {
        "version": INDEX_VERSION, "dtype": dtype, "vocab_size": vocab_size, "eot_id": eot_id,
        "tokenizer_sha256": tokenizer.fingerprint, "eot": EOT_LAYOUT, "shards": shards,
        "splits": {split: {"tokens": w.tokens, "docs": w.docs, "shards": len(w.records)}
                   for split, w in writers.items()},
        "sources": [s.to_dict() for s in sources],
        "mixture": "each source read whole" if all(w is None for w in run.weights)
                   else "proportional to weights, stops when a weighted source runs out",
        "stats": _stats(sources, removals, state, contamination, run.dedup, run.minhash),
    }


@dataclass
class _PackState:
    dedup: str
    minhash: MinHashConfig
    contamination: ContaminationIndex | None
    decontaminate_mode: str
    val_fraction: float
    seed: int
    seen_keys: set = field(default_factory=set)
    lsh: LSHIndex | None = None
    kept_docs: int = 0
    kept_bytes: int = 0
    flagged: dict = field(default_factory=dict)  # contamination hits per eval file
    examples: list = field(default_factory=list)  # the first few, with the shared n-gram

    def __post_init__(self):
        if self.dedup == "minhash":
            self.lsh = LSHIndex(self.minhash)
        self._salt = int(self.seed).to_bytes(8, "little", signed=True)

    def split_of(self, key: bytes) -> str:
        """val for a fixed pseudo-random fraction of documents, decided by text and seed alone."""
        if self.val_fraction <= 0:
            return "train"
        draw = hashlib.blake2b(key, digest_size=8, salt=self._salt).digest()
        return "val" if int.from_bytes(draw, "little") < self.val_fraction * 2**64 else "train"


def _pack_chunk(chunk, result: ChunkResult, sources, writers, removals: Removals,
                state: _PackState) -> None:
    """Apply, in input order, the decisions that need every earlier document: dedup, split."""
    token_ends = np.cumsum(result.token_lengths)
    passed = 0
    for (source, doc), reason, size, key, signature, match in zip(
            chunk, result.reasons, result.sizes, result.keys, result.signatures,
            result.contaminated):
        if reason is not None:
            removals.add("" if reason == "empty" else "filter", reason, doc, size)
            continue
        ids = result.tokens[token_ends[passed] - result.token_lengths[passed]:token_ends[passed]]
        passed += 1
        if state.dedup != "none":
            if key in state.seen_keys:
                removals.add("dedup", "exact", doc, size)
                continue
            state.seen_keys.add(key)
        if state.lsh is not None:
            if state.lsh.find(signature) is not None:
                removals.add("dedup", "minhash", doc, size)
                continue
            state.lsh.add(signature)
        if match is not None:
            eval_file, ngram = state.contamination.files[match[0]], match[1]
            state.flagged[eval_file] = state.flagged.get(eval_file, 0) + 1
            if len(state.examples) < MAX_EXAMPLES:
                state.examples.append({"id": doc.id, "eval_file": eval_file, "ngram": ngram})
            if state.decontaminate_mode == "drop":
                removals.add("decontaminate", Path(eval_file).name, doc, size,
                             f"{eval_file}: {ngram}")
                continue
        writers[state.split_of(key)].add_document(ids)
        record = sources[source]
        record.docs_kept += 1
        record.bytes_kept += size
        record.tokens += int(ids.size) + 1
        state.kept_docs += 1
        state.kept_bytes += size


def _stats(sources, removals: Removals, state: _PackState, contamination, dedup, minhash) -> dict:
    read = SourceStats()
    problems = []
    for s in sources:
        for name in ("documents", "bytes", "files", "invalid_utf8_documents", "malformed_lines",
                     "empty_documents"):
            setattr(read, name, getattr(read, name) + getattr(s.read, name))
        problems.extend(s.read.problems)
    stats = {
        "read": {"docs": read.documents, "bytes": read.bytes, "files": read.files,
                 "invalid_utf8_docs": read.invalid_utf8_documents,
                 "malformed_lines": read.malformed_lines, "empty_docs": read.empty_documents,
                 "problems": problems[:20]},
        "removed": dict(sorted(removals.counts.items())),
        "filters": {k.split(".", 1)[1]: v for k, v in sorted(removals.counts.items())
                    if k.startswith("filter.")},
        "filtered": removals.total("filter"),
        "empty": removals.total("empty"),
        "dedup": {"mode": dedup, "exact": removals.total("dedup.exact"),
                  "minhash": removals.total("dedup.minhash")},
        "kept": {"docs": state.kept_docs, "bytes": state.kept_bytes},
    }
    if dedup == "minhash":
        stats["dedup"]["minhash_config"] = minhash.to_dict()
    if contamination is not None:
        stats["decontamination"] = {**contamination.summary(), "mode": state.decontaminate_mode,
                                    "docs_flagged": sum(state.flagged.values()),
                                    "flagged_by_file": state.flagged,
                                    "examples": state.examples,
                                    **removals.total("decontaminate")}
    return stats


def _why_empty(sources, removals: Removals) -> str:
    read = sum(s.read.documents for s in sources)
    if read == 0:
        return "the inputs hold no documents"
    parts = [f"{k}: {v['docs']}" for k, v in sorted(removals.counts.items())]
    return f"all {read} documents read were removed ({', '.join(parts)})"


# -- helpers ----------------------------------------------------------------------------------
def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from scratchlm.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    for name in ("vocab_size", "eot_id", "fingerprint"):
        if getattr(tokenizer, name, None) is None:
            raise UserError(f"tokenizer has no {name!r}; it cannot write a dataset")
    return tokenizer


def _save_tokenizer_copy(tokenizer, out_dir: Path) -> None:
    # A dataset carries its tokenizer so `data sample` can decode it without being told which.
    save = getattr(tokenizer, "save", None)
    if save is not None:
        save(out_dir / "tokenizer")


def _input_fingerprint(specs: list[str]) -> list:
    """Sizes and modification times of the input files: a changed input forces a rebuild."""
    from scratchlm.data.sources import resolve_files

    out = []
    for spec in specs:
        if spec.startswith("hf:"):
            out.append([spec])
            continue
        try:
            for path in resolve_files(spec):
                st = path.stat()
                out.append([str(path), st.st_size, st.st_mtime_ns])
        except (UserError, OSError):
            out.append([spec, None])
    return out


def _is_same_complete_dataset(out_dir: Path, settings_sha: str) -> bool:
    index_path = out_dir / INDEX_NAME
    if not index_path.is_file():
        return False
    try:
        index = read_json(index_path, "dataset index")
        return index.get("settings_sha256") == settings_sha and bool(Dataset.open(out_dir))
    except UserError:
        return False


def _progress_bar(specs: list[str], enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=input_size(specs), unit="B", unit_scale=True, unit_divisor=1024,
                desc="prepare", file=sys.stderr, dynamic_ncols=True)
