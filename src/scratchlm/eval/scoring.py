"""The scoring core every evaluation shares: log-likelihoods of token continuations, batched.

Evaluation only needs a function from token ids `[B, T]` to logits `[B, T, V]` and the longest
window it accepts, so this module works with the scratchlm Transformer, a quantized or LoRA
variant of it, or a hand-built test model alike (`ScoringModel`). It scores many
(context, continuation) requests per forward pass: requests are sorted by length and
right-padded, which is exact for a causal model because a position never attends to the padding
after it. Inputs longer than the window are truncated from the left, and the caller is told once.
It also holds greedy decoding for generation tasks: batched with a KV cache (through
`scratchlm.infer.generate`) for scratchlm Transformers, a plain loop for any other model.
Not for prompt formatting or metrics (see `scratchlm.eval.tasks`, `scratchlm.eval.bpb`) nor for
sampling-based generation (see `scratchlm.infer`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_BATCH_SIZE = 32
DEFAULT_BATCH_TOKENS = 8192  # caps B*T so the [B, T, V] logits fit in memory


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's window and lost tokens on the left."""


@dataclass
class ScoringModel:
    """The minimal model interface evaluation needs: ids `[B, T]` -> logits `[B, T, V]`."""

    forward: LogitsFn
    max_seq_len: int
    device: torch.device | str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_tokens: int = DEFAULT_BATCH_TOKENS

    @torch.inference_mode()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward(idx.to(self.device)).float()

    @torch.inference_mode()
    def selected_logits(self, idx: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits `[N, V]` at (rows[i], positions[i]) only.

        For a scratchlm Transformer the output head runs on just those positions (a forward
        pre-hook on its `lm_head` selects them): with a large vocabulary the head is a good part
        of the work and of the memory, and scoring needs only the continuation's positions.
        """
        head = _output_head(self.forward)
        if head is None:
            return self.logits(idx)[rows.to(self.device), positions.to(self.device)]
        r, p = rows.to(self.device), positions.to(self.device)
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][r, p], *args[1:]))
        try:
            return self.forward(idx.to(self.device)).float()
        finally:
            handle.remove()


def _output_head(model) -> torch.nn.Module | None:
    """The `lm_head` module of a scratchlm Transformer (whose forward ends in it), else None."""
    try:
        from scratchlm.model.transformer import Transformer
    except ImportError:
        return None
    head = getattr(model, "lm_head", None) if isinstance(model, Transformer) else None
    return head if isinstance(head, torch.nn.Module) else None


def as_scoring_model(model, max_seq_len: int | None = None, batch_size: int | None = None) -> ScoringModel:
    """Wrap a Transformer (or anything callable with `config.max_seq_len` / `max_seq_len`)."""
    if isinstance(model, ScoringModel):
        return model if batch_size is None else dataclasses.replace(model, batch_size=batch_size)
    if max_seq_len is None:
        config = getattr(model, "config", None)
        max_seq_len = getattr(config, "max_seq_len", None) or getattr(model, "max_seq_len", None)
    if not max_seq_len:
        raise ValueError("cannot tell the model's window: pass max_seq_len")
    device = _model_device(model)
    if isinstance(model, torch.nn.Module):
        model.eval()
    return ScoringModel(
        forward=model,
        max_seq_len=int(max_seq_len),
        device=device,
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
    )


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@dataclass
class Request:
    """Score `continuation` given `context` (token ids; context must not be empty)."""

    context: Sequence[int]
    continuation: Sequence[int]


@dataclass
class Score:
    logprob: float  # sum of natural-log probabilities of the continuation tokens scored
    n_tokens: int  # continuation tokens scored (fewer than asked only if truncation ate them)
    is_greedy: bool  # every scored token is the argmax of its distribution
    truncated: bool  # the context lost tokens on the left to fit the window


def _window(request: Request, max_seq_len: int) -> tuple[list[int], int, bool]:
    """The tokens to run (at most max_seq_len + 1, the last one only a target) and how many to score."""
    if not request.context:
        raise ValueError("a request needs at least one context token (e.g. the EOT token)")
    tokens = list(request.context) + list(request.continuation)
    truncated = len(tokens) > max_seq_len + 1
    tokens = tokens[-(max_seq_len + 1):]
    n_score = min(len(request.continuation), len(tokens) - 1)
    return tokens, n_score, truncated


def _batches(order: list[int], lengths: list[int], batch_size: int, batch_tokens: int):
    """Consecutive slices of `order` (longest first) with at most batch_size rows and ~batch_tokens."""
    batch: list[int] = []
    for i in order:
        width = max([lengths[j] for j in batch[:1]] + [lengths[i]])  # longest is first
        if batch and (len(batch) >= batch_size or width * (len(batch) + 1) > batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_requests(
    model: ScoringModel,
    requests: Sequence[Request],
    progress: Callable[[int], None] | None = None,
    warn_truncation: str | None = "inputs",
) -> list[Score]:
    """Score every request; results come back in the order of `requests`.

    `progress(n)` is called after each batch with the number of requests it finished. When some
    inputs had to be truncated, one `TruncationWarning` names how many (`warn_truncation` is the
    noun used in it; None to stay quiet and let the caller report).
    """
    windows = [_window(r, model.max_seq_len) for r in requests]
    lengths = [len(tokens) - 1 for tokens, _, _ in windows]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    results: list[Score | None] = [None] * len(requests)
    for batch in _batches(order, lengths, model.batch_size, model.batch_tokens):
        for i, score in zip(batch, _score_batch(model, [windows[i] for i in batch])):
            results[i] = score
        if progress:
            progress(len(batch))
    n_truncated = sum(1 for _, _, t in windows if t)
    if n_truncated and warn_truncation:
        warn_truncated(n_truncated, len(requests), model.max_seq_len, warn_truncation)
    return results  # type: ignore[return-value]


def warn_truncated(n_truncated: int, total: int, max_seq_len: int, what: str) -> None:
    warnings.warn(
        f"{n_truncated} of {total} {what} are longer than the model's window "
        f"({max_seq_len} tokens); truncated from the left",
        TruncationWarning,
        stacklevel=3,
    )


def _score_batch(model: ScoringModel, windows: list[tuple[list[int], int, bool]]) -> list[Score]:
    width = max(len(tokens) - 1 for tokens, _, _ in windows)
    idx = torch.zeros((len(windows), width), dtype=torch.long)
    targets = torch.zeros((len(windows), width), dtype=torch.long)
    scored = torch.zeros((len(windows), width), dtype=torch.bool)
    for row, (tokens, n_score, _) in enumerate(windows):
        # Right padding: a causal model's logits at real positions never see it.
        n = len(tokens) - 1
        idx[row, :n] = torch.tensor(tokens[:-1], dtype=torch.long)
        targets[row, :n] = torch.tensor(tokens[1:], dtype=torch.long)
        scored[row, n - n_score : n] = True  # logits at position p predict tokens[p + 1]
    rows, positions = scored.nonzero(as_tuple=True)
    picked_logits = model.selected_logits(idx, rows, positions).cpu()  # [N, V]
    picked_targets = targets[rows, positions]
    logprobs = torch.log_softmax(picked_logits, dim=-1).gather(1, picked_targets[:, None]).squeeze(1)
    missed = (picked_logits.argmax(dim=-1) != picked_targets).double()
    sums = torch.zeros(len(windows), dtype=torch.float64).index_add_(0, rows, logprobs.double())
    misses = torch.zeros(len(windows), dtype=torch.float64).index_add_(0, rows, missed)
    return [
        Score(float(sums[row]), n_score, bool(misses[row] == 0), truncated)
        for row, (_, n_score, truncated) in enumerate(windows)
    ]


def fit_prompt(prompt: Sequence[int], max_new_tokens: int, max_seq_len: int) -> tuple[list[int], int, bool]:
    """(prompt keeping its end, max_new_tokens, truncated) so that both fit in the window."""
    max_new_tokens = min(max_new_tokens, max_seq_len - 1)
    room = max_seq_len - max_new_tokens
    return list(prompt[-room:]), max_new_tokens, len(prompt) > room


def greedy_generate(
    model: ScoringModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    stop_strings: Sequence[str] = (),
) -> tuple[list[int], bool]:
    """Greedy-decode up to `max_new_tokens` after `prompt`; returns (new ids, prompt truncated).

    Stops after a token in `stop_ids` (not included) or as soon as the decoded output contains
    one of `stop_strings` (the caller cuts the text there; `decode` is needed for that). The
    prompt keeps its last `max_seq_len - max_new_tokens` tokens. No KV cache: the plain
    reference path, for any model (see `generate_batch` for the fast one).
    """
    stop_ids = set(stop_ids)
    tokens, max_new_tokens, truncated = fit_prompt(prompt, max_new_tokens, model.max_seq_len)
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model.logits(torch.tensor([tokens], dtype=torch.long))[0, -1].argmax())
        if next_id in stop_ids:
            break
        new.append(next_id)
        tokens.append(next_id)
        if stop_strings and decode is not None and _has_stop(decode(new), stop_strings):
            break
    return new, truncated


def _has_stop(text: str, stop_strings: Sequence[str]) -> bool:
    return any(s in text for s in stop_strings)


def _kv_cache_model(model: ScoringModel):
    """The scratchlm Transformer behind a ScoringModel, if it is one (it can use a KV cache)."""
    try:
        from scratchlm.model.transformer import Transformer
    except ImportError:
        return None
    return model.forward if isinstance(model.forward, Transformer) else None


def generate_batch(
    model: ScoringModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    stop_strings: Sequence[str] = (),
) -> list[tuple[list[int], bool]]:
    """`greedy_generate` for many prompts: batched with a KV cache when the model is a scratchlm
    Transformer (`scratchlm.infer.generate.BatchDecoder`), one at a time otherwise."""
    stop_ids = list(stop_ids)
    transformer = _kv_cache_model(model)
    if transformer is None:
        return [greedy_generate(model, p, max_new_tokens, stop_ids, decode, stop_strings) for p in prompts]
    from scratchlm.infer.generate import BatchDecoder

    fitted = [fit_prompt(p, max_new_tokens, model.max_seq_len) for p in prompts]
    results: list[tuple[list[int], bool]] = []
    for start in range(0, len(prompts), model.batch_size):
        chunk = fitted[start : start + model.batch_size]
        decoder = BatchDecoder(transformer, [p for p, _, _ in chunk], max_new_tokens=chunk[0][1], stop_ids=stop_ids)
        while not decoder.done:
            for row, _ in decoder.step():
                if stop_strings and decode is not None and _has_stop(decode(decoder.rows[row].tokens), stop_strings):
                    decoder.finish(row)
        results.extend((list(r.tokens), truncated) for r, (_, _, truncated) in zip(decoder.rows, chunk))
    return results


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        if s:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]
