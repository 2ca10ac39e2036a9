"""Counting unique split chunks in a stream of texts, spread over all cores.

BPE training needs each distinct chunk once, with how often it occurs; this module produces that
`Counter`. The main process reads texts and hands batches to worker processes, each of which
splits and counts its share; the per-worker counts are summed at the end (so what crosses
process boundaries is the text once and each worker's distinct chunks once). Not for learning
merges (see `merging.py`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter
from typing import Iterable

from tqdm import tqdm

from scratchlm.tokenizer.patterns import split_text

BATCH_CHARS = 1 << 21  # characters of text per batch sent to a worker
_STOP = None


def count_chunks(
    texts: Iterable[str],
    pattern_str: str,
    max_bytes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[Counter, int]:
    """`(Counter of chunk -> occurrences, UTF-8 bytes read)` over `texts` (at most `max_bytes`)."""
    workers = default_workers() if workers is None else max(1, workers)
    batches = _batches(texts, max_bytes)
    bar = tqdm(total=max_bytes, unit="B", unit_scale=True, desc="counting chunks",
               disable=not progress, leave=False)
    try:
        if workers == 1:
            return _count_here(batches, pattern_str, bar)
        return _count_in_workers(batches, pattern_str, workers, bar)
    finally:
        bar.close()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _batches(texts: Iterable[str], max_bytes: int | None):
    """Yield (list of texts, their UTF-8 size), cutting the stream at `max_bytes`."""
    batch, chars, total = [], 0, 0
    for text in texts:
        size = len(text.encode("utf-8", "surrogatepass")) if not text.isascii() else len(text)
        if max_bytes is not None and total + size > max_bytes:
            text = _truncate_to_bytes(text, max_bytes - total)
            size = len(text.encode("utf-8", "surrogatepass"))
        if text:
            batch.append(text)
            chars += len(text)
            total += size
        if chars >= BATCH_CHARS:
            yield batch, total
            batch, chars = [], 0
        if max_bytes is not None and total >= max_bytes:
            break
    if batch:
        yield batch, total


def _truncate_to_bytes(text: str, budget: int) -> str:
    # Cut on a character boundary so the sample stays valid text.
    return text.encode("utf-8", "surrogatepass")[:max(budget, 0)].decode("utf-8", "ignore")


def _count_batch(counter: Counter, batch: list[str], pattern_str: str) -> None:
    for text in batch:
        counter.update(split_text(text, pattern_str))


def _count_here(batches, pattern_str, bar) -> tuple[Counter, int]:
    counter: Counter = Counter()
    total = 0
    for batch, total_so_far in batches:
        _count_batch(counter, batch, pattern_str)
        bar.update(total_so_far - total)
        total = total_so_far
    return counter, total


def _worker(pattern_str: str, inbox, outbox) -> None:
    counter: Counter = Counter()
    while (batch := inbox.get()) is not _STOP:
        _count_batch(counter, batch, pattern_str)
    outbox.put(dict(counter))


def _count_in_workers(batches, pattern_str, workers, bar) -> tuple[Counter, int]:
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    inbox, outbox = ctx.Queue(maxsize=2 * workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(pattern_str, inbox, outbox), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    total = 0
    try:
        for batch, total_so_far in batches:
            inbox.put(batch)
            bar.update(total_so_far - total)
            total = total_so_far
        for _ in procs:
            inbox.put(_STOP)
        counter: Counter = Counter(outbox.get())
        for _ in range(workers - 1):
            counter.update(outbox.get())
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return counter, total
