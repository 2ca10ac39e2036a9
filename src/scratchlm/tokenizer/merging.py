"""The two hot loops of byte-level BPE: learning merges, and merging the bytes of one chunk.

Both exist here in plain Python as the reference implementation. The optional C extension
`scratchlm.tokenizer._fastbpe` implements the very same algorithms (tests hold the two to
identical merges and ids); `learn_merges` and `ChunkEncoder` use it when it is built and fall
back to the Python code when it is not. Not for splitting text, special tokens or file formats.

Learning (`learn_merges`). Every unique chunk is a "word": its bytes, and how often it occurs.
Pair counts are computed once; after each merge only the words that contain the merged pair
are revisited, and only their pairs' counts change (the corpus is never recounted). A heap
holds (count, pair) entries; entries go stale when a count drops and are fixed when popped.
Ties: the highest count wins, then the smallest (left id, right id). If the merged bytes are
already a token (two pairs can spell the same bytes), the existing id is reused, so every token
has distinct bytes.

Encoding (`ChunkEncoder`) follows tiktoken's rule, which needs only the vocabulary: a chunk
that is itself a token is that token; otherwise, starting from single bytes, repeatedly join
the adjacent pair whose concatenated bytes form the token with the lowest id (leftmost on a
tie). Short chunks use a simple scan; long ones a heap over a linked list, so one million
repeated characters cost O(n log n), not O(n^2).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Callable, Sequence

from scratchlm.tokenizer.patterns import _fastbpe  # the optional C extension, or None

# Chunks up to this many bytes are merged by rescanning all pairs each step (fast for the
# short chunks text is made of); longer ones switch to the heap.
SHORT_CHUNK = 48

ProgressFn = Callable[[int], None]


def have_extension() -> bool:
    return _fastbpe is not None


# ----------------------------------------------------------------------------- learning


def learn_merges(
    words: Sequence[bytes],
    counts: Sequence[int],
    vocab_size: int,
    progress: ProgressFn | None = None,
    use_extension: bool | None = None,
) -> tuple[list[bytes], list[tuple[int, int, int]]]:
    """Learn merges until the vocabulary (256 bytes + merged tokens) has `vocab_size` entries.

    Returns `(vocab, merges)`: `vocab[id]` is the token's bytes, `merges` the learned
    `(left, right, new_id)` in order. Stops early when no pair is left to merge.
    """
    if use_extension is None:
        use_extension = _fastbpe is not None
    if use_extension:
        if _fastbpe is None:
            raise RuntimeError("the C extension scratchlm.tokenizer._fastbpe is not built")
        return _fastbpe.learn_merges(list(words), list(counts), vocab_size, progress)
    return _learn_merges_py(words, counts, vocab_size, progress)


def _learn_merges_py(words, counts, vocab_size, progress):
    vocab = [bytes([i]) for i in range(256)]
    id_of = {b: i for i, b in enumerate(vocab)}
    seqs = [list(w) for w in words]
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += counts[wi]
            pair_words[pair].add(wi)
    # Min-heap on (-count, left, right): highest count first, then the smallest pair.
    heap = [(-c, a, b) for (a, b), c in pair_count.items() if c > 0]
    heapq.heapify(heap)
    merges: list[tuple[int, int, int]] = []
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        current = pair_count.get((a, b), 0)
        if current <= 0:
            continue
        if current != -neg:  # stale: the count dropped since this entry was pushed
            heapq.heappush(heap, (-current, a, b))
            continue
        new_id = _token_for(vocab[a] + vocab[b], vocab, id_of)
        merges.append((a, b, new_id))
        changed = _apply_merge(seqs, counts, pair_count, pair_words, a, b, new_id)
        for pair in changed:
            if pair_count[pair] > 0:
                heapq.heappush(heap, (-pair_count[pair], pair[0], pair[1]))
        if progress is not None:
            progress(len(vocab))
    return vocab, merges


def _token_for(merged: bytes, vocab: list[bytes], id_of: dict[bytes, int]) -> int:
    """The id for these bytes: the existing token's, or a new one appended to the vocabulary."""
    existing = id_of.get(merged)
    if existing is not None:
        return existing
    id_of[merged] = len(vocab)
    vocab.append(merged)
    return len(vocab) - 1


def _apply_merge(seqs, counts, pair_count, pair_words, a, b, new_id) -> set[tuple[int, int]]:
    """Merge (a, b) in every word that holds it, moving pair counts; returns the pairs touched."""
    changed: set[tuple[int, int]] = set()
    for wi in pair_words.pop((a, b), ()):
        seq, c = seqs[wi], counts[wi]
        merged = merge_pair(seq, a, b, new_id)
        if len(merged) == len(seq):  # stale entry: this word no longer holds the pair
            continue
        for pair in zip(seq, seq[1:]):
            pair_count[pair] -= c
            changed.add(pair)
        for pair in zip(merged, merged[1:]):
            pair_count[pair] += c
            pair_words[pair].add(wi)
            changed.add(pair)
        seqs[wi] = merged
    return changed


def merge_pair(seq: list[int], a: int, b: int, new_id: int) -> list[int]:
    """`seq` with each non-overlapping (a, b), taken left to right, replaced by `new_id`."""
    out, i, n = [], 0, len(seq)
    while i < n:
        if i + 1 < n and seq[i] == a and seq[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


# ----------------------------------------------------------------------------- encoding


def build_pair_table(vocab: Sequence[bytes]) -> dict[tuple[int, int], int]:
    """(left id, right id) -> id of the token their bytes spell, for every split of every token."""
    id_of = {b: i for i, b in enumerate(vocab)}
    table: dict[tuple[int, int], int] = {}
    for token_id in range(256, len(vocab)):
        token = vocab[token_id]
        for cut in range(1, len(token)):
            left, right = id_of.get(token[:cut]), id_of.get(token[cut:])
            if left is not None and right is not None:
                table[(left, right)] = token_id
    return table


class ChunkEncoder:
    """Turns chunks (already split text) into token ids, with a cache of chunk -> ids."""

    MAX_CACHE = 1 << 19  # entries; the cache is cleared when it grows past this
    MAX_CACHED_CHUNK = 256  # characters; longer chunks are rare and not worth keeping

    def __init__(self, vocab: Sequence[bytes], use_extension: bool | None = None):
        self.vocab = list(vocab)
        self.id_of = {b: i for i, b in enumerate(self.vocab)}
        self.table = build_pair_table(self.vocab)
        self.cache: dict[str, list[int]] = {}
        if use_extension is None:
            use_extension = _fastbpe is not None
        self._native = _fastbpe.Encoder(self.vocab) if use_extension else None

    def encode_chunks(self, chunks: Sequence[str]) -> list[int]:
        """The ids of all chunks, concatenated."""
        if self._native is not None:
            return self._native.encode_chunks(chunks)
        out: list[int] = []
        cache = self.cache
        for chunk in chunks:
            ids = cache.get(chunk)
            if ids is None:
                ids = self.encode_bytes(chunk.encode("utf-8", "surrogatepass"))
                if len(chunk) <= self.MAX_CACHED_CHUNK:
                    if len(cache) >= self.MAX_CACHE:
                        cache.clear()
                    cache[chunk] = ids
            out.extend(ids)
        return out

    def encode_bytes(self, piece: bytes) -> list[int]:
        """The ids of one chunk's bytes (tiktoken's rule, see the module docstring)."""
        if self._native is not None:
            return self._native.encode_bytes(piece)
        whole = self.id_of.get(piece)
        if whole is not None:
            return [whole]
        if len(piece) <= SHORT_CHUNK:
            return _merge_by_scan(list(piece), self.table)
        return _merge_by_heap(list(piece), self.table)


def _merge_by_scan(ids: list[int], table) -> list[int]:
    while len(ids) >= 2:
        best, best_at = None, -1
        for i in range(len(ids) - 1):
            token = table.get((ids[i], ids[i + 1]))
            if token is not None and (best is None or token < best):
                best, best_at = token, i
        if best is None:
            break
        ids[best_at : best_at + 2] = [best]
    return ids


def _merge_by_heap(ids: list[int], table) -> list[int]:
    # A doubly linked list over positions; a merge keeps the left position. Heap entries are
    # (token, position, left id, right id) and are skipped when the pair there has changed.
    n = len(ids)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        token = table.get((ids[i], ids[i + 1]))
        if token is not None:
            heap.append((token, i, ids[i], ids[i + 1]))
    heapq.heapify(heap)
    while heap:
        token, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j >= n or ids[i] != left or ids[j] != right:
            continue
        ids[i] = token
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        for p in (prv[i], i):
            q = nxt[p] if p >= 0 else n
            if p >= 0 and q < n:
                joined = table.get((ids[p], ids[q]))
                if joined is not None:
                    heapq.heappush(heap, (joined, p, ids[p], ids[q]))
    return [ids[i] for i in range(n) if alive[i]]
