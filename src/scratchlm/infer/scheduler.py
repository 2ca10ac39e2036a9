"""Continuous batching: many generation requests share one model, one decode step at a time.

What it is for: the server's engine. A single worker thread owns the model. Requests wait in a
bounded queue (`QueueFull` when it is full); at every iteration the worker admits waiting
requests into free batch slots (prefilling their prompts together), then runs ONE forward pass
that decodes the next token for every active request, whatever its length or age. A request
leaves the batch the moment it finishes (stop id, stop string, length) or is cancelled (its
client went away), and its slot is reused at the next iteration.

How rows of different ages share one KV cache: every active row's keys/values end at the same
cache slot `L` (the cache's `length`); a row that holds n tokens occupies slots [L - n, L) and
`pad[row] = L - n` slots before it are masked out. Each row's positions count from its own first
token, so a row sees exactly what it would see alone (the same trick as left padding in
`generate.BatchDecoder`). A new request is prefilled in a scratch cache and copied in
right-aligned at `L`; when the cache fills up, the slots no row uses are cut off the front.

Text handling (UTF-8-safe pieces, stop strings), sampling and masks are reused from
`scratchlm.infer.generate` / `sampling`. Not for HTTP (see `server.py`) or tokenization.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from scratchlm.infer import generate as gen
from scratchlm.infer.sampling import GREEDY, Sampler, SamplingParams


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should answer 429 and let the client retry."""


@dataclass
class GenerationRequest:
    """One sequence to generate: prompt ids (already fitted to the context) and how to stop."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    ignore_eos: bool = False  # keep going past end-of-text (benchmarks want fixed lengths)


@dataclass
class Event:
    """A piece of text for one request; the last event has `finish_reason` set."""

    text: str
    finish_reason: str | None = None  # "stop", "length", or "error"
    completion_tokens: int = 0
    error: str | None = None


class RequestHandle:
    """The caller's side of a request: its events (sync or async) and `cancel()`."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.id = next(self._ids)
        self.request = request
        self.cancelled = False
        self.finished = False
        self.submitted_at = time.perf_counter()
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue | None = None if loop is not None else queue.Queue()

    def cancel(self) -> None:
        """Stop generating for this request (a client disconnected); frees its slot."""
        self.cancelled = True

    def _emit(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.finished = True
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                self.cancelled = True
        else:
            self._queue.put(event)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator over events, ending after the final one (threads, tests, benchmarks)."""
        assert self._queue is not None, "this handle was made for an event loop: use `async for`"
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    async def aevents(self):
        """Async iterator over events, ending after the final one."""
        assert self._async_queue is not None, "this handle was made without an event loop"
        while True:
            event = await self._async_queue.get()
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class _Row:
    """An active request inside the batch."""

    handle: RequestHandle
    text: gen.TextStream
    stop_ids: set[int]
    tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerStats:
    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    max_active: int = 0
    compactions: int = 0


class Scheduler:
    """Continuous batching over one model (see the module docstring).

    `max_batch` bounds the rows decoded together, `max_queue` the requests waiting for a row.
    `max_batch=1` serves requests one at a time (the baseline the benchmark compares against).
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256,
                 cache_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_len = gen.context_length(model)
        # Room beyond one context window means fewer compactions as rows of different ages mix.
        self.cache_len = cache_len or 2 * self.context_len
        self.device = gen.model_device(model)
        # Sample only ids the tokenizer can decode (a model's embedding table may be padded).
        self.vocab_size = min(model.config.vocab_size, tokenizer.vocab_size)
        self.stats = SchedulerStats()
        self._waiting: list[RequestHandle] = []
        self._rows: list[_Row] = []
        self._cache = None
        self._pad = torch.zeros(0, dtype=torch.long, device=self.device)
        self._next_input = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self._sampler: Sampler | None = None
        self._lock = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    # -- the caller's side ----------------------------------------------------------------------

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="scratchlm-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        return self.submit_many([request], loop)[0]

    def submit_many(self, requests: Sequence[GenerationRequest],
                    loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue requests together (all or none: the `n` choices of one API call)."""
        for r in requests:
            if not r.prompt_ids or len(r.prompt_ids) + r.max_new_tokens > self.context_len:
                raise ValueError("prompt must be non-empty and fit the context with max_new_tokens")
        handles = [RequestHandle(r, loop) for r in requests]
        with self._lock:
            if len(self._waiting) + len(handles) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.extend(handles)
            self._lock.notify_all()
        return handles

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows)

    # -- the worker -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not self._rows:
                    self._lock.wait()
                if not self._running:
                    break
                self._waiting = [h for h in self._waiting if not h.cancelled]
                free = self.max_batch - len(self._rows)
                admitted, self._waiting = self._waiting[:free], self._waiting[free:]
            try:
                self.iterate(admitted)
            except Exception as e:  # a bug must not take the server down: fail these requests
                self._fail_all(admitted, f"{type(e).__name__}: {e}")
        self._fail_all([], "the server is shutting down")

    @torch.inference_mode()
    def iterate(self, admitted: Sequence[RequestHandle] = ()) -> None:
        """One scheduling iteration: drop cancelled rows, admit and prefill, decode one step."""
        self._drop_rows([i for i, r in enumerate(self._rows) if r.handle.cancelled])
        if admitted:
            self._admit(list(admitted))
        if self._rows:
            self._decode_step()

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill new prompts together in a scratch cache, sample their first tokens, splice in."""
        prompts = [h.request.prompt_ids for h in handles]
        ids, pad = gen.left_pad(prompts, 0, self.device)
        width = ids.shape[1]
        scratch = gen.new_kv_cache(self.model, len(handles), width)
        padding = {}
        if bool((pad > 0).any()):
            padding = {"positions": gen.padded_positions(pad, 0, width),
                       "attn_mask": gen.padded_attention_mask(pad, 0, width)}
        logits = self.model(ids, kv_cache=scratch, **padding)[:, -1, : self.vocab_size]
        sampler = Sampler([h.request.sampling for h in handles], len(handles), self.vocab_size, self.device)
        for i, p in enumerate(prompts):
            sampler.record_prompt(i, p)
        first = sampler(logits)
        self.stats.prefills += 1

        self._make_room(front=width)
        base = len(self._rows)
        L = self._cache.length
        for layer in range(len(self._cache.keys)):
            self._cache.keys[layer][base : base + len(handles), :, L - width : L] = scratch.keys[layer][:, :, :width]
            self._cache.values[layer][base : base + len(handles), :, L - width : L] = scratch.values[layer][:, :, :width]
        self._pad = torch.cat([self._pad, pad + (L - width)])
        self._next_input = torch.cat([self._next_input, first.unsqueeze(1)])
        self._sampler = _merge_samplers(self._sampler, sampler, self.vocab_size, self.device)
        for h in handles:
            stop_ids = set(gen.stop_ids_for(self.tokenizer, h.request.stop_ids, h.request.ignore_eos))
            self._rows.append(_Row(h, gen.TextStream(self.tokenizer, h.request.stop), stop_ids))
        self.stats.max_active = max(self.stats.max_active, len(self._rows))
        self._take_tokens(first, range(base, base + len(handles)))

    def _decode_step(self) -> None:
        self._make_room(back=1)
        L = self._cache.length
        logits = self.model(
            self._next_input,
            kv_cache=self._cache,
            positions=gen.padded_positions(self._pad, L, 1),
            attn_mask=gen.padded_attention_mask(self._pad, L, 1),
        )[:, -1, : self.vocab_size]
        tokens = self._sampler(logits)
        self._next_input = tokens.unsqueeze(1)
        self.stats.steps += 1
        self._take_tokens(tokens, range(len(self._rows)))

    def _take_tokens(self, tokens: torch.Tensor, rows: range) -> None:
        """Hand each row its new token as text; finish rows that hit a stop or their length."""
        finished = []
        for row_index, token in zip(rows, tokens.tolist()):
            row = self._rows[row_index]
            reason = None
            if token in row.stop_ids:
                reason = "stop"
                piece = ""
            else:
                row.tokens.append(token)
                self.stats.tokens += 1
                piece = row.text.push(token)
                if row.text.stopped:
                    reason = "stop"
                elif len(row.tokens) >= row.handle.request.max_new_tokens:
                    reason = "length"
            if reason is None:
                if piece:
                    row.handle._emit(Event(piece, None, len(row.tokens)))
                continue
            row.handle._emit(Event(piece + row.text.flush(), reason, len(row.tokens)))
            finished.append(row_index)
        self._drop_rows(finished)

    # -- cache bookkeeping ----------------------------------------------------------------------

    def _make_room(self, front: int = 0, back: int = 0) -> None:
        """Ensure `L >= front` (a prompt of that width can be spliced in right-aligned at `L`)
        and `L + back <= max_len` (every row can take `back` more tokens)."""
        if self._cache is None:
            self._cache = gen.new_kv_cache(self.model, self.max_batch, self.cache_len)
        cache = self._cache
        if not self._rows:
            cache.length = 0
        if back and cache.length + back > cache.max_len:
            # cut the slots that no row uses off the front; an unfinished row always holds fewer
            # than context_len <= max_len slots, so this always makes room
            self._shift(-int(self._pad.min()))
            self.stats.compactions += 1
        if cache.length < front:
            self._shift(front - cache.length)

    def _shift(self, delta: int) -> None:
        """Move every row's slots by `delta` (negative: towards the front)."""
        cache, B, L = self._cache, len(self._rows), self._cache.length
        if delta == 0:
            return
        if B:
            src = slice(max(0, -delta), L)
            dst = slice(max(0, delta), L + delta)
            for buf in cache.keys + cache.values:
                buf[:B, :, dst] = buf[:B, :, src].clone()
            self._pad = self._pad + delta
        cache.length = L + delta

    def _drop_rows(self, indices: Sequence[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._pad = self._pad[idx]
        self._next_input = self._next_input[idx]
        if keep:
            # like generate.select_cache_rows, but only the slots in use: the rest is stale
            L = self._cache.length
            for buf in self._cache.keys + self._cache.values:
                buf[: len(keep), :, :L] = buf[idx, :, :L]
            self._sampler.select_rows(idx)
        else:
            self._sampler = None
            self._cache.length = 0

    def _fail_all(self, admitted: Sequence[RequestHandle], message: str) -> None:
        """End every active (and just admitted) request with an error event; reset the batch."""
        handles = [r.handle for r in self._rows] + list(admitted)
        if not self._running:  # shutting down: the waiting requests will never run either
            with self._lock:
                handles += self._waiting
                self._waiting = []
        for h in handles:
            if not h.finished:
                h._emit(Event("", "error", 0, message))
        self._rows = []
        self._pad = self._pad[:0]
        self._next_input = self._next_input[:0]
        self._sampler = None
        if self._cache is not None:
            self._cache.length = 0


def _merge_samplers(old: Sampler | None, new: Sampler, vocab_size: int, device) -> Sampler:
    """One sampler for old rows + new rows, keeping each row's generator and token history."""
    if old is None:
        return new
    merged = Sampler(old.params + new.params, len(old.params) + len(new.params), vocab_size, device)
    merged.generators = old.generators + new.generators
    if merged.uses_history:
        n_old = len(old.params)
        for source, rows in ((old, slice(0, n_old)), (new, slice(n_old, None))):
            if source.uses_history:
                merged.seen[rows] = source.seen
                merged.generated_counts[rows] = source.generated_counts
    return merged
