"""Text generation with a KV cache: prefill once, then one token per step against static buffers.

The layers, bottom up:
- `BatchDecoder`: token level. Left-pads prompts of different lengths into one batch (positions
  and an attention mask make each row see exactly what it would see alone), runs the prompt
  through the model once (prefill) into a preallocated `KVCache`, then decodes one token per row
  per step. Stop ids, `max_new_tokens` and `ignore_eos` end rows; rows that finish are dropped
  from the batch so the rest decode faster. Decode steps go through `fast_decode`'s C kernels
  over packed weights when the model allows it (any number of rows; without a C compiler, one-row
  steps use its torch fused step instead); `fused=False` uses the model's forward.
  `use_cache=False` recomputes the whole sequence each
  step (the slow reference path tests and benchmarks compare against).
- `IncrementalDecoder` / `StopMatcher`: text level. Token bytes become text only once a UTF-8
  character is complete (an emoji spread over four byte tokens arrives whole), and text that
  could be the start of a stop string is held back until it is known not to be one, so a stop
  string split across tokens is still caught and never shown.
- `generate` / `stream`: prompts (text or ids) in, `Completion`s or text pieces out.
- `speculative_generate`: greedy decoding with a small draft model proposing tokens that the
  target verifies in one forward; output identical to the target alone.

Not for loading runs or chat formatting (see `scratchlm.infer.api`), nor for serving many
clients (the server's scheduler builds on `BatchDecoder`'s pieces).
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from scratchlm.errors import UserError
from scratchlm.infer.fast_decode import fused_step_for, supports_native
from scratchlm.infer.sampling import GREEDY, Sampler, SamplingParams

OVERFLOW_CHOICES = ("error", "truncate")


# ---- context window ---------------------------------------------------------------------------


def fit_to_context(prompt_ids: Sequence[int], max_new_tokens: int, context_len: int,
                   overflow: str = "error") -> list[int]:
    """The prompt, made to fit with `max_new_tokens` in the model's context window.

    overflow="error" raises a UserError naming the lengths; "truncate" drops the oldest prompt
    tokens (left truncation), keeping the most recent context.
    """
    if overflow not in OVERFLOW_CHOICES:
        raise UserError(f"overflow={overflow!r}: expected one of {', '.join(OVERFLOW_CHOICES)}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one token")
    room = context_len - max_new_tokens
    if len(prompt_ids) <= room:
        return list(prompt_ids)
    if overflow == "error" or room < 1:
        raise UserError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"model's context window of {context_len} tokens"
            + ("" if room < 1 else " (use overflow='truncate' to drop the oldest prompt tokens)")
        )
    return list(prompt_ids[-room:])


# ---- the model side: cache and masks ----------------------------------------------------------


def context_length(model) -> int:
    return int(model.config.max_seq_len)


def model_device(model) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def activation_dtype(model) -> torch.dtype:
    """The dtype activations (and so the KV cache) have: that of the first float parameter or
    buffer (a quantized model keeps integer codes but computes in float)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def new_kv_cache(model, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
    """A preallocated cache for `batch_size` rows of up to `max_len` tokens, in `dtype` (default:
    the model's activation dtype)."""
    from scratchlm.model.kv_cache import KVCache

    return KVCache.for_config(model.config, batch_size, max_len, dtype=dtype or activation_dtype(model),
                              device=model_device(model))


def select_cache_rows(cache, idx: torch.Tensor) -> None:
    """Keep only rows `idx` of a cache, moved to the front of its static buffers (no reallocation:
    the cache attends over its first B rows when given a batch of B)."""
    n = len(idx)
    for buffer in cache.keys + cache.values:
        buffer[:n] = buffer[idx]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` ids with each prompt right-aligned, and the number of pad columns per row."""
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    return torch.tensor(rows, dtype=torch.long, device=device), pad


def padded_positions(pad: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Absolute positions `[B, length]` of columns start..start+length-1, counted from each row's
    first real token (pad columns get 0; nothing attends to them)."""
    cols = torch.arange(start, start + length, device=pad.device)
    return (cols.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)


def padded_attention_mask(pad: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """`[B, 1, length, start+length]` bool: causal, never onto a pad column. A pad column's own
    query sees itself only, so its softmax is defined (its output is never used)."""
    total = start + length
    keys = torch.arange(total, device=pad.device)
    queries = torch.arange(start, total, device=pad.device)
    causal = keys.unsqueeze(0) <= queries.unsqueeze(1)  # [T, S]
    real_key = keys.unsqueeze(0) >= pad.unsqueeze(1)  # [B, S]
    mask = causal.unsqueeze(0) & real_key.unsqueeze(1)
    mask = mask | (keys.unsqueeze(0) == queries.unsqueeze(1)).unsqueeze(0)
    return mask.unsqueeze(1)


# ---- token-level batch decoding ---------------------------------------------------------------


@dataclass
class RowState:
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop id or string) or "length"


class BatchDecoder:
    """Generates tokens for a batch of prompts, one step at a time.

    `step()` returns the `(row, token)` pairs produced this step (a row that hits a stop id
    finishes without producing it); `finish(row)` ends a row early (a stop string matched).
    The prompts must already fit the context window (see `fit_to_context`).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
                 stop_ids: Sequence[int] = (), use_cache: bool = True, pad_id: int = 0,
                 fused: bool = True) -> None:
        if not prompts:
            raise UserError("no prompts given")
        limit = context_length(model)
        for i, p in enumerate(prompts):
            if not p:
                raise UserError(f"prompt {i} is empty: give at least one token")
            if len(p) + max_new_tokens > limit:
                raise UserError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} "
                                f"exceeds the context window of {limit}")
        self.model = model
        self.device = model_device(model)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        self.use_cache = use_cache
        self.rows = [RowState(prompt_len=len(p)) for p in prompts]
        self.sampler = Sampler(sampling, len(prompts), model.config.vocab_size, self.device)
        for i, p in enumerate(prompts):
            self.sampler.record_prompt(i, p)
        self.ids, self.pad = left_pad(prompts, pad_id, self.device)  # [B, T0]
        self.any_pad = bool((self.pad > 0).any())
        self.active = torch.arange(len(prompts), device=self.device)  # batch row -> original row
        # Decode steps through fast_decode's step where the model allows (same numbers up to
        # matmul rounding order, less CPU per token); built on the first decode step. Its C
        # kernels keep the cache in fp32 (a bf16 model's prefill stores its keys exactly there).
        self.fused = use_cache and fused
        self.fused_step = None
        cache_dtype = torch.float32 if self.fused and supports_native(model) else None
        self.cache = (new_kv_cache(model, len(prompts), self.ids.shape[1] + max_new_tokens, cache_dtype)
                      if use_cache else None)
        self.next_input: torch.Tensor | None = None  # [B, 1] token fed at the next step
        self.steps = 0
        if max_new_tokens == 0:
            for row in self.rows:
                row.finish_reason = "length"

    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)

    def finish(self, row: int, reason: str = "stop") -> None:
        if self.rows[row].finish_reason is None:
            self.rows[row].finish_reason = reason

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        if self.done:
            return []
        self._drop_finished_rows()
        logits = self._next_logits()
        tokens = self.sampler(logits)
        self.steps += 1
        self.next_input = tokens.unsqueeze(1)
        if not self.use_cache:
            self.ids = torch.cat([self.ids, self.next_input], dim=1)
        is_stop = torch.isin(tokens, self.stop_ids) if len(self.stop_ids) else None
        produced = []
        for b, (row_index, token) in enumerate(zip(self.active.tolist(), tokens.tolist())):
            row = self.rows[row_index]
            if row.finish_reason is not None:
                continue
            if is_stop is not None and bool(is_stop[b]):
                row.finish_reason = "stop"
                continue
            row.tokens.append(token)
            produced.append((row_index, token))
            if len(row.tokens) >= self.max_new_tokens:
                row.finish_reason = "length"
        return produced

    def _next_logits(self) -> torch.Tensor:
        """Logits `[B, V]` for the next token of each active row."""
        if not self.use_cache:
            width = self.ids.shape[1]
            logits = self.model(self.ids, **self._padding_args(0, width))
            return logits[:, -1, :]
        if self.next_input is None:  # prefill: the whole prompt once
            width = self.ids.shape[1]
            logits = self.model(self.ids, kv_cache=self.cache, **self._padding_args(0, width))
            return logits[:, -1, :]
        start = self.cache.length
        if self.fused and self.fused_step is None:
            self.fused_step = fused_step_for(self.model)
            self.fused = self.fused_step is not None
        if self.fused and _takes_rows(self.fused_step, len(self.next_input)):
            return self.fused_step(self.next_input, self.cache, **self._padding_args(start, 1))
        logits = self.model(self.next_input, kv_cache=self.cache, **self._padding_args(start, 1))
        return logits[:, -1, :]

    def _padding_args(self, start: int, length: int) -> dict:
        if not self.any_pad:
            return {}  # the model's own causal mask and arange positions are exactly right
        return {
            "positions": padded_positions(self.pad, start, length),
            "attn_mask": padded_attention_mask(self.pad, start, length),
        }

    def _drop_finished_rows(self) -> None:
        """Remove finished rows from the batch (cache, pads, sampler) so they cost nothing."""
        keep = [b for b, r in enumerate(self.active.tolist()) if self.rows[r].finish_reason is None]
        if len(keep) == len(self.active):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.active = self.active[idx]
        self.pad = self.pad[idx]
        self.ids = self.ids[idx]
        self.sampler.select_rows(idx)
        if self.next_input is not None:
            self.next_input = self.next_input[idx]
        if self.cache is not None:
            select_cache_rows(self.cache, idx)
        # Columns that are padding in every remaining row can go too, but the cache is static;
        # keeping them costs little and keeps positions simple.
        self.any_pad = bool((self.pad > 0).any())


def _takes_rows(step, rows: int) -> bool:
    """Whether a fast decode step is the faster path for a step of `rows` rows."""
    return step.max_rows is None or rows <= step.max_rows


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
                 stop_ids: Sequence[int] = (), use_cache: bool = True, fused: bool = True) -> list[list[int]]:
    """Token ids generated for each prompt (stop ids not included)."""
    decoder = BatchDecoder(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stop_ids, use_cache=use_cache, fused=fused)
    while not decoder.done:
        decoder.step()
    return [r.tokens for r in decoder.rows]


# ---- text level: UTF-8-safe incremental decoding and stop strings -----------------------------


class IncrementalDecoder:
    """Token ids -> text, emitting only complete UTF-8 characters.

    Bytes of an unfinished character are held back until the next token completes it; bytes
    that can never form a character become U+FFFD, as `bytes.decode(errors="replace")` would.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text now safe to show; sets `stopped` (and drops the rest) once a stop string appears."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        keep = self._held_back_length()
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return out

    def _held_back_length(self) -> int:
        # The longest tail of the buffer that is a proper prefix of some stop string.
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), longest, -1):
                if self.buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class TextStream:
    """One row's text as its tokens arrive: UTF-8 completion, then stop strings."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def push(self, token_id: int) -> str:
        return self.matcher.push(self.decoder.push(token_id))

    def flush(self) -> str:
        return self.matcher.push(self.decoder.flush()) + self.matcher.flush()


# ---- text in, text out ------------------------------------------------------------------------


@dataclass
class Completion:
    """One prompt's result."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    elapsed_s: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamEvent:
    """A piece of one row's text; `finish_reason` is set on that row's last event."""

    row: int
    text: str
    finish_reason: str | None = None


def stop_ids_for(tokenizer, stop_ids: Sequence[int] | None, ignore_eos: bool) -> list[int]:
    """The ids that end a row: the caller's, plus end-of-text unless `ignore_eos`."""
    ids = list(stop_ids or [])
    eot = getattr(tokenizer, "eot_id", None)
    if not ignore_eos and eot is not None:
        ids.append(int(eot))
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    # Text is encoded as plain text: a special-token string typed into a prompt stays text.
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


def stream_events(model, tokenizer, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 256,
                  sampling: SamplingParams | Sequence[SamplingParams] = GREEDY, stop: Sequence[str] = (),
                  stop_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                  overflow: str = "error", use_cache: bool = True,
                  completions: list | None = None) -> Iterator[StreamEvent]:
    """Generate for a batch of prompts, yielding text pieces as they become safe to show.

    If `completions` is a list, it is filled with one `Completion` per prompt when done.
    """
    start = time.perf_counter()
    limit = context_length(model)
    ids = [fit_to_context(p, max_new_tokens, limit, overflow) for p in encode_prompts(tokenizer, prompts)]
    decoder = BatchDecoder(model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stop_ids_for(tokenizer, stop_ids, ignore_eos), use_cache=use_cache)
    texts = [TextStream(tokenizer, stop) for _ in ids]
    pieces: list[list[str]] = [[] for _ in ids]
    closed = [False] * len(ids)

    def close(row: int) -> StreamEvent:
        closed[row] = True
        tail = texts[row].flush()
        pieces[row].append(tail)
        return StreamEvent(row, tail, decoder.rows[row].finish_reason or "stop")

    while not decoder.done:
        for row, token in decoder.step():
            piece = texts[row].push(token)
            if texts[row].stopped:
                decoder.finish(row, "stop")
            if piece:
                pieces[row].append(piece)
                yield StreamEvent(row, piece)
        for row, state in enumerate(decoder.rows):
            if state.finish_reason is not None and not closed[row]:
                yield close(row)
    for row in range(len(ids)):
        if not closed[row]:
            yield close(row)
    if completions is not None:
        elapsed = time.perf_counter() - start
        completions.extend(
            Completion("".join(pieces[r]), decoder.rows[r].tokens, decoder.rows[r].finish_reason or "stop",
                       len(ids[r]), elapsed)
            for r in range(len(ids))
        )


def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]], **kwargs) -> list[Completion]:
    """One `Completion` per prompt (batched; greedy results equal generating each alone)."""
    completions: list[Completion] = []
    for _ in stream_events(model, tokenizer, prompts, completions=completions, **kwargs):
        pass
    return completions


# ---- scoring ----------------------------------------------------------------------------------


@torch.inference_mode()
def token_logprobs(model, ids: Sequence[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 (the first token has no prediction)."""
    if len(ids) > context_length(model):
        raise UserError(f"text of {len(ids)} tokens exceeds the context window of {context_length(model)}")
    x = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    logits = model(x).float()
    logp = logits[0, :-1].log_softmax(dim=-1)
    return logp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()


# ---- speculative decoding ---------------------------------------------------------------------


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of which the target agreed with
    target_forwards: int = 0
    draft_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@torch.inference_mode()
def speculative_generate(target, draft, prompt: Sequence[int], *, max_new_tokens: int,
                         num_draft: int = 4, stop_ids: Sequence[int] = ()) -> tuple[list[int], SpeculativeStats]:
    """Greedy generation of one prompt where `draft` proposes `num_draft` tokens at a time.

    The target scores all proposals in one forward; the longest prefix it agrees with is kept,
    plus the target's own next token, so the output is token for token what the target alone
    would produce greedily. Both caches are rolled back past rejected tokens.
    """
    if target.config.vocab_size != draft.config.vocab_size:
        raise UserError(f"draft vocab {draft.config.vocab_size} != target vocab {target.config.vocab_size}")
    limit = min(context_length(target), context_length(draft))
    if len(prompt) + max_new_tokens > limit:
        raise UserError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceeds "
                        f"the context window of {limit}")
    device = model_device(target)
    stops = set(stop_ids)
    max_len = len(prompt) + max_new_tokens
    t_cache, d_cache = new_kv_cache(target, 1, max_len), new_kv_cache(draft, 1, max_len)
    stats = SpeculativeStats()
    x = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    next_token = int(target(x, kv_cache=t_cache)[0, -1].argmax())
    draft(x[:, :-1], kv_cache=d_cache)  # the draft lags one token: it sees the last one next
    stats.target_forwards += 1
    stats.draft_forwards += 1
    out: list[int] = []
    pending = [int(prompt[-1])]  # tokens the draft has not seen yet
    while True:
        if next_token in stops:
            break
        out.append(next_token)
        if len(out) >= max_new_tokens:
            break
        # Draft proposes k tokens after next_token.
        pending.append(next_token)
        k = min(num_draft, max_new_tokens - len(out))
        proposal = []
        feed = torch.tensor([pending], dtype=torch.long, device=device)
        for _ in range(k):
            tok = int(draft(feed, kv_cache=d_cache)[0, -1].argmax())
            stats.draft_forwards += 1
            proposal.append(tok)
            feed = torch.tensor([[tok]], dtype=torch.long, device=device)
        # Target checks next_token + proposal in one forward.
        verify = torch.tensor([[next_token] + proposal], dtype=torch.long, device=device)
        t_len = t_cache.length
        choices = target(verify, kv_cache=t_cache)[0].argmax(dim=-1).tolist()
        stats.target_forwards += 1
        stats.proposed += k
        n_ok = 0
        while n_ok < k and proposal[n_ok] == choices[n_ok]:
            n_ok += 1
        stats.accepted += n_ok
        # Keep next_token and the accepted proposals in both caches; roll back the rest.
        t_cache.truncate(t_len + 1 + n_ok)
        d_len_kept = t_len + 1 + n_ok
        accepted = proposal[:n_ok]
        stopped = False
        for tok in accepted:
            if tok in stops:
                stopped = True
                break
            out.append(tok)
            if len(out) >= max_new_tokens:
                stopped = True
                break
        if stopped:
            break
        next_token = choices[n_ok]
        # The draft cache holds prompt + pending + proposals[:-1]; keep what the target kept,
        # minus the last accepted token, which the draft will see again as `pending`.
        if n_ok == k:
            # All accepted: the draft never saw its own last proposal.
            d_cache.truncate(min(d_cache.length, d_len_kept - 1))
            pending = [proposal[-1]]
        else:
            d_cache.truncate(d_len_kept)
            pending = []
    return out[:max_new_tokens], stats
