"""Encoding many texts on all cores (`BPETokenizer.encode_batch`).

Worker processes are forked with the tokenizer already in memory (nothing to pickle but the
texts and the ids), each encodes a contiguous slice, and the results come back in order. Small
batches are encoded in this process, where starting workers would cost more than it saves.
Not for training (see `counting.py`).
"""

from __future__ import annotations

import multiprocessing as mp
from array import array

SERIAL_BELOW_CHARS = 1 << 20  # below this much text, workers are not worth starting
SLICES_PER_WORKER = 4

_TOKENIZER = None  # set in the parent just before forking; the workers inherit it
_ALLOWED = ()


def encode_batch(tokenizer, texts: list[str], allowed_special, workers: int) -> list[list[int]]:
    total_chars = sum(map(len, texts))
    if workers <= 1 or len(texts) < 2 or total_chars < SERIAL_BELOW_CHARS \
            or "fork" not in mp.get_all_start_methods():
        return [tokenizer.encode(t, allowed_special) for t in texts]
    global _TOKENIZER, _ALLOWED
    _TOKENIZER, _ALLOWED = tokenizer, allowed_special
    try:
        slices = _slices(texts, total_chars, workers * SLICES_PER_WORKER)
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_encode_slice, slices, chunksize=1)
    finally:
        _TOKENIZER, _ALLOWED = None, ()
    out: list[list[int]] = []
    for lengths, flat in parts:
        pos = 0
        for n in lengths:
            out.append(flat[pos : pos + n].tolist())
            pos += n
    return out


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


def _encode_slice(texts: list[str]):
    # Ids travel back as one flat uint32 array (cheap to pickle) plus each text's length.
    flat = array("I")
    lengths = []
    for t in texts:
        ids = _TOKENIZER.encode(t, _ALLOWED)
        lengths.append(len(ids))
        flat.extend(ids)
    return lengths, flat
