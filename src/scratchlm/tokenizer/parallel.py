"""Encoding many texts on all cores (`BPETokenizer.encode_batch`).

A pool of worker processes is forked with the tokenizer already in memory and kept with the
tokenizer, so later calls reuse it and each worker's chunk cache stays warm (a fresh pool per
call would start every worker cold). Only the texts and the ids cross process boundaries, the
ids as flat uint32 arrays. Small batches, and calls from inside a daemon worker (which may not
have children), are encoded in this process. Not for training (see `counting.py`).
"""

from __future__ import annotations

import multiprocessing as mp
import weakref
from array import array

SERIAL_BELOW_CHARS = 1 << 20  # below this much text, workers are not worth it
SLICES_PER_WORKER = 4

_TOKENIZER = None  # set in the parent while the pool forks; the workers inherit it


def encode_batch(tokenizer, texts: list[str], allowed_special, workers: int) -> list[list[int]]:
    total_chars = sum(map(len, texts))
    if (workers <= 1 or len(texts) < 2 or total_chars < SERIAL_BELOW_CHARS
            or "fork" not in mp.get_all_start_methods() or mp.current_process().daemon):
        return [tokenizer.encode(t, allowed_special) for t in texts]
    pool = _pool_for(tokenizer, workers)
    slices = [(s, allowed_special) for s in _slices(texts, total_chars, workers * SLICES_PER_WORKER)]
    out: list[list[int]] = []
    for lengths, flat in pool.imap(_encode_slice, slices, chunksize=1):
        pos = 0
        for n in lengths:
            out.append(flat[pos : pos + n].tolist())
            pos += n
    return out


def _pool_for(tokenizer, workers: int):
    """The tokenizer's pool of `workers` processes, made (again) if missing or out of date."""
    held = getattr(tokenizer, "_worker_pool", None)
    if held is not None and held[0] == workers and held[1] == tokenizer.fingerprint:
        return held[2]
    if held is not None:
        held[2].terminate()
    global _TOKENIZER
    _TOKENIZER = tokenizer
    try:
        pool = mp.get_context("fork").Pool(workers)
    finally:
        _TOKENIZER = None
    tokenizer._worker_pool = (workers, tokenizer.fingerprint, pool)
    weakref.finalize(tokenizer, pool.terminate)
    return pool


def close_pool(tokenizer) -> None:
    """Stop the tokenizer's worker processes now (they also stop when it is garbage collected)."""
    held = getattr(tokenizer, "_worker_pool", None)
    if held is not None:
        held[2].terminate()
        tokenizer._worker_pool = None


def _slices(texts: list[str], total_chars: int, n: int) -> list[list[str]]:
    """Contiguous slices of roughly equal text length, in order."""
    target = max(1, total_chars // n)
    slices, current, size = [], [], 0
    for t in texts:
        current.append(t)
        size += len(t)
        if size >= target:
            slices.append(current)
            current, size = [], 0
    if current:
        slices.append(current)
    return slices


def _encode_slice(task):
    # Ids travel back as one flat uint32 array (cheap to pickle) plus each text's length.
    texts, allowed = task
    flat = array("I")
    lengths = []
    for t in texts:
        ids = _TOKENIZER.encode(t, allowed)
        lengths.append(len(ids))
        flat.extend(ids)
    return lengths, flat
