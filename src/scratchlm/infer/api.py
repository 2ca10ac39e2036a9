"""The Python API a user reaches first: `lm = scratchlm.load(RUN)`, then generate, stream, chat, score.

    lm = scratchlm.load("runs/x")
    lm.generate("Once upon a time", max_new_tokens=50)           # greedy by default
    lm.generate(["a", "b"], temperature=0.8, top_p=0.95, seed=0)  # a batch
    for piece in lm.stream("Once"): print(piece, end="")
    lm.chat([{"role": "user", "content": "hi"}])                  # once the model has a chat template
    lm.logprobs("some text")

Sampling keywords are those of `SamplingParams` (temperature, top_k, top_p, min_p,
repetition_penalty, frequency_penalty, presence_penalty, seed); the rest are `stop` (strings),
`stop_ids`, `ignore_eos`, `max_new_tokens`, `overflow` ("error" or "truncate").
Not for the generation loop itself (see `scratchlm.infer.generate`) or serving (`server.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch

from scratchlm.errors import UserError
from scratchlm.infer import generate as gen
from scratchlm.infer.sampling import SamplingParams

SAMPLING_KEYS = {f.name for f in fields(SamplingParams)}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load(run_dir: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> "LM":
    """Load a run dir (weights, tokenizer, config) ready to generate."""
    from scratchlm.runs import load_run

    run = load_run(run_dir, device=device)
    if run.tokenizer is None:
        raise UserError(f"run {run_dir} has no tokenizer/ (needed to turn text into tokens)")
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        run.model.to(DTYPES[dtype])
    return LM(run.model, run.tokenizer, run.config, run.path)


@dataclass
class TokenLogprobs:
    """Per-token log-probabilities of a text under the model (the first token has none)."""

    ids: list[int]
    tokens: list[str]
    logprobs: list[float]  # logprobs[i] scores ids[i + 1]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


class LM:
    """A model and its tokenizer, with text-in/text-out methods."""

    def __init__(self, model, tokenizer, config: dict | None = None, path=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or {}
        self.path = path

    def __repr__(self) -> str:
        return f"LM({self.path or 'in-memory'}, {self.model.num_parameters():,} parameters)"

    @property
    def context_length(self) -> int:
        return gen.context_length(self.model)

    @property
    def has_chat_template(self) -> bool:
        from scratchlm.posttrain.chat_template import has_chat_tokens

        return has_chat_tokens(self.tokenizer)

    # -- generation ---------------------------------------------------------------------------

    def complete(self, prompts: str | Sequence[str | Sequence[int]], **kwargs: Any) -> list[gen.Completion]:
        """`Completion`s (text, token ids, finish reason, counts) for one prompt or a batch."""
        return gen.generate(self.model, self.tokenizer, _as_batch(prompts), **_options(kwargs))

    def generate(self, prompt: str | Sequence[str], **kwargs: Any) -> str | list[str]:
        """The generated text (a list for a list of prompts)."""
        texts = [c.text for c in self.complete(prompt, **kwargs)]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Text pieces as they are generated; never splits a UTF-8 character or shows a stop string."""
        for event in gen.stream_events(self.model, self.tokenizer, [prompt], **_options(kwargs)):
            if event.text:
                yield event.text

    def chat(self, messages: Sequence[dict], stream: bool = False, **kwargs: Any) -> str | Iterator[str]:
        """The assistant's reply to a conversation, rendered with the model's chat template."""
        from scratchlm.posttrain.chat_template import chat_stop_ids, render_chat

        ids = render_chat(self.tokenizer, messages, add_generation_prompt=True).ids
        kwargs["stop_ids"] = list(kwargs.get("stop_ids") or []) + chat_stop_ids(self.tokenizer)
        kwargs.setdefault("overflow", "truncate")
        if stream:
            return self.stream(ids, **kwargs)
        return self.complete([ids], **kwargs)[0].text

    def logprobs(self, text: str) -> TokenLogprobs:
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise UserError("logprobs needs a text of at least two tokens")
        scores = gen.token_logprobs(self.model, ids)
        return TokenLogprobs(ids, [self.tokenizer.decode([i]) for i in ids], scores)


def _as_batch(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _options(kwargs: dict) -> dict:
    """Split keyword arguments into `SamplingParams` and the generation options."""
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_KEYS}
    sampling.setdefault("temperature", 0.0)
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    allowed = {"max_new_tokens", "stop", "stop_ids", "ignore_eos", "overflow", "use_cache"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise UserError(f"unknown generation option {unknown[0]!r}; known: "
                        f"{', '.join(sorted(allowed | SAMPLING_KEYS))}")
    return {"sampling": SamplingParams(**sampling), **kwargs}
