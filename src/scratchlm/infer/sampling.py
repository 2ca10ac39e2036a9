"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, seeds.

Every function works on a batch of logits `[B, V]` and can take a different setting per row, so
the same sampler serves one prompt, a batch of prompts, or a server batching many requests.
Order (as transformers and vLLM apply them): repetition penalty, frequency/presence penalty,
temperature, top-k, top-p, min-p, then a draw. Temperature 0 means greedy (argmax).
Not for running the model or deciding when to stop (see `scratchlm.infer.generate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch

from scratchlm.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are plain sampling at temperature 1; `temperature=0` is greedy.

    repetition_penalty: CTRL-style, >1 discourages any token already in prompt or output.
    frequency_penalty / presence_penalty: OpenAI-style, subtracted per occurrence / once, for
    tokens already generated (not the prompt), as vLLM and the OpenAI API define them.
    seed: makes the draws reproducible (a per-row generator); None draws from torch's global RNG.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"sampling parameter {name}={getattr(self, name)!r} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown sampling parameter {unknown[0]!r}; known: {sorted(known)}")
        return cls(**d)


GREEDY = SamplingParams(temperature=0.0)


# ---- logit transforms (each [B, V] -> [B, V]; per-row settings as [B, 1] tensors) -------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL penalty: a seen token's positive logit is divided by `penalty`, a negative one multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI penalties: minus `frequency` per earlier occurrence, minus `presence` once if any."""
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def filter_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (k = 0 keeps all); ties at the threshold are kept."""
    vocab = logits.shape[-1]
    k = torch.where(k <= 0, torch.full_like(k, vocab), k.clamp(max=vocab))
    sorted_logits = logits.sort(dim=-1, descending=True).values
    threshold = sorted_logits.gather(-1, k - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of top tokens whose probability reaches p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Ascending order: drop the low tail whose total mass is <= 1 - p; the top token always stays.
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---- the sampler ----------------------------------------------------------------------------


def _column(values: Sequence[float | int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device).unsqueeze(-1)


class Sampler:
    """Picks one token per row from `[B, V]` logits, each row with its own `SamplingParams`.

    `history` (for the penalties) is a per-row token-count tensor the caller keeps with
    `record(...)`: prompt tokens count for the repetition penalty, generated ones for both.
    """

    def __init__(self, params: SamplingParams | Sequence[SamplingParams], batch_size: int,
                 vocab_size: int, device: torch.device | str = "cpu") -> None:
        if isinstance(params, SamplingParams):
            params = [params] * batch_size
        if len(params) != batch_size:
            raise ValueError(f"{len(params)} sampling params for a batch of {batch_size}")
        self.params = list(params)
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.all_greedy = all(p.greedy for p in self.params)
        self.uses_history = any(p.uses_history for p in self.params)
        self.generators = [self._generator(p.seed) for p in self.params]
        # Per-row settings as [B, 1] columns so one vectorised op handles the whole batch.
        f32 = torch.float32
        self.temperature = _column([p.temperature or 1.0 for p in self.params], f32, self.device)
        self.top_k = _column([p.top_k for p in self.params], torch.long, self.device)
        self.top_p = _column([p.top_p for p in self.params], f32, self.device)
        self.min_p = _column([p.min_p for p in self.params], f32, self.device)
        self.repetition = _column([p.repetition_penalty for p in self.params], f32, self.device)
        self.frequency = _column([p.frequency_penalty for p in self.params], f32, self.device)
        self.presence = _column([p.presence_penalty for p in self.params], f32, self.device)
        self.greedy_rows = torch.tensor([p.greedy for p in self.params], device=self.device)
        if self.uses_history:
            self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=self.device)
            self.generated_counts = torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=self.device)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed))
        return g

    def record_prompt(self, row: int, ids: Sequence[int]) -> None:
        """Prompt tokens count as 'seen' for the repetition penalty (not for frequency/presence)."""
        if self.uses_history and len(ids):
            self.seen[row, torch.as_tensor(list(ids), device=self.device)] = True

    def record(self, tokens: torch.Tensor) -> None:
        """Count the tokens just generated, one per row (`[B]`)."""
        if self.uses_history:
            rows = torch.arange(tokens.shape[0], device=self.device)
            self.seen[rows, tokens] = True
            self.generated_counts[rows, tokens] += 1

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after penalties and temperature/top-k/top-p/min-p (what the draw uses)."""
        logits = logits.float()
        if self.uses_history:
            logits = apply_repetition_penalty(logits, self.seen, self.repetition)
            logits = apply_frequency_presence(logits, self.generated_counts, self.frequency, self.presence)
        if self.all_greedy:
            return logits
        logits = logits / self.temperature
        if bool((self.top_k > 0).any()):
            logits = filter_top_k(logits, self.top_k)
        if bool((self.top_p < 1).any()):
            logits = filter_top_p(logits, self.top_p)
        if bool((self.min_p > 0).any()):
            logits = filter_min_p(logits, self.min_p)
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row, `[B]` int64. Also records it for the penalties."""
        logits = self.process(logits)
        choice = logits.argmax(dim=-1)
        if not self.all_greedy:
            drawn = self._draw(logits)
            choice = torch.where(self.greedy_rows, choice, drawn)
        self.record(choice)
        return choice

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        if all(g is None for g in self.generators):
            return torch.multinomial(probs, 1).squeeze(-1)
        # Seeded rows draw from their own generator so a request's output does not depend on
        # which other requests share its batch.
        rows = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
        return torch.cat(rows)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Drop finished rows (a bool or index tensor over the batch) to keep decoding lean."""
        idx = keep.nonzero().squeeze(-1) if keep.dtype == torch.bool else keep
        ids = idx.tolist()
        self.params = [self.params[i] for i in ids]
        self.generators = [self.generators[i] for i in ids]
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition", "frequency", "presence",
                     "greedy_rows"):
            setattr(self, name, getattr(self, name)[idx])
        if self.uses_history:
            self.seen = self.seen[idx]
            self.generated_counts = self.generated_counts[idx]
