"""Bits per byte (and per-token perplexity) of a model on held-out text.

Bits per byte = total negative log-likelihood in bits / total UTF-8 bytes of the text scored. It
does not depend on the tokenizer, so models with different vocabularies compare fairly. Each
document is scored on its own, after the EOT token (documents follow one in training); every
token is predicted exactly once. A document longer than the window is scored with a sliding
window: each new window advances by `stride` tokens and scores only the tokens it adds, so every
token sees at least `max_seq_len - stride` tokens of context (stride 1 gives each token all the
context that fits; the default, half the window, costs about 2x a single pass).
The end of a document (the next EOT) is not scored: it has no bytes. Not for benchmark tasks
(see `scratchlm.eval.tasks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from scratchlm.errors import UserError
from scratchlm.eval.scoring import Request, as_scoring_model, score_requests


@dataclass
class BpbResult:
    bpb: float
    nats: float  # total negative log-likelihood, natural log
    bytes: int
    tokens: int
    documents: int

    @property
    def perplexity(self) -> float:
        """Per-token perplexity (depends on the tokenizer, unlike bpb)."""
        return math.exp(self.nats / self.tokens) if self.tokens else float("nan")

    def to_dict(self) -> dict:
        return {
            "bpb": self.bpb,
            "perplexity": self.perplexity,
            "nats": self.nats,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "documents": self.documents,
        }


def rolling_requests(tokens: Sequence[int], prefix_id: int, max_seq_len: int, stride: int | None = None) -> list[Request]:
    """Windows that predict every token of `tokens` once, each after `prefix_id` and as much
    earlier text as the window allows (see the module docstring)."""
    stride = max_seq_len // 2 if stride is None else stride
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be in 1..{max_seq_len}, got {stride}")
    full = [prefix_id] + list(tokens)
    window = max_seq_len + 1  # tokens in a window: max_seq_len inputs, the last only a target
    requests = []
    scored_to = min(len(full), window)  # the first window predicts full[1:scored_to]
    if len(full) > 1:
        requests.append(Request(full[:1], full[1:scored_to]))
    while scored_to < len(full):
        end = min(scored_to + stride, len(full))
        begin = max(0, end - window)
        requests.append(Request(full[begin:scored_to], full[scored_to:end]))
        scored_to = end
    return requests


def document_logprob(model, tokens: Sequence[int], prefix_id: int, stride: int | None = None) -> float:
    """Total natural-log probability of `tokens` after `prefix_id` (lm-eval's rolling loglikelihood)."""
    scorer = as_scoring_model(model)
    requests = rolling_requests(tokens, prefix_id, scorer.max_seq_len, stride)
    return sum(s.logprob for s in score_requests(scorer, requests, warn_truncation=None))


def bits_per_byte_tokens(
    model,
    tokenizer,
    documents: Iterable[Sequence[int]],
    stride: int | None = None,
    progress: bool = False,
) -> BpbResult:
    """Bits per byte of already-tokenized documents (bytes = the tokens' byte lengths)."""
    scorer = as_scoring_model(model)
    eot = tokenizer.eot_id
    requests, owners, n_bytes, n_docs = [], [], 0, 0
    for doc in documents:
        doc = list(doc)
        if not doc:
            continue
        n_docs += 1
        n_bytes += sum(len(tokenizer.token_bytes(t)) for t in doc)
        requests.extend(rolling_requests(doc, eot, scorer.max_seq_len, stride))
    if not requests:
        raise UserError("no text to score for bits per byte")
    from tqdm.auto import tqdm

    with tqdm(total=len(requests), desc="bpb", unit="win", disable=not progress, leave=False) as bar:
        scores = score_requests(scorer, requests, progress=bar.update, warn_truncation=None)
    nats = -sum(s.logprob for s in scores)
    tokens = sum(s.n_tokens for s in scores)
    return BpbResult(bpb=nats / math.log(2) / n_bytes, nats=nats, bytes=n_bytes, tokens=tokens, documents=n_docs)


def bits_per_byte_texts(model, tokenizer, texts: Iterable[str], stride: int | None = None, progress: bool = False) -> BpbResult:
    """Bits per byte of text documents; bytes are counted from the text itself (UTF-8)."""
    texts = [t for t in texts if t]
    docs = [tokenizer.encode(t) for t in texts]
    result = bits_per_byte_tokens(model, tokenizer, docs, stride=stride, progress=progress)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if text_bytes != result.bytes:  # the tokenizer dropped or added bytes: trust the text
        result.bpb = result.nats / math.log(2) / text_bytes
        result.bytes = text_bytes
    return result


def bits_per_byte(
    model,
    tokenizer,
    source: str,
    stride: int | None = None,
    max_documents: int | None = None,
    split: str = "val",
    progress: bool = False,
) -> BpbResult:
    """Bits per byte of a source: a dataset dir (its `split`) or any text source spec
    (`.txt`, `.jsonl`, directory, `builtin:NAME`)."""
    path = Path(source)
    if path.is_dir() and (path / "index.json").exists():
        docs = dataset_documents(path, tokenizer, split)
        if max_documents is not None:
            docs = docs[:max_documents]
        return bits_per_byte_tokens(model, tokenizer, docs, stride=stride, progress=progress)
    from scratchlm.data.sources import iter_texts

    texts = []
    for text in iter_texts(source):
        if text:
            texts.append(text)
        if max_documents is not None and len(texts) >= max_documents:
            break
    return bits_per_byte_texts(model, tokenizer, texts, stride=stride, progress=progress)


def dataset_documents(dataset_dir: Path, tokenizer, split: str = "val") -> list[list[int]]:
    """The documents of a dataset dir's split, as token lists (EOT separators removed)."""
    from scratchlm.data.shards import Dataset

    dataset = Dataset.open(dataset_dir)
    if dataset.eot_id != tokenizer.eot_id or dataset.vocab_size > _vocab_size(tokenizer):
        raise UserError(f"dataset {dataset_dir} was not made with this model's tokenizer")
    docs = [doc.tolist() for doc in dataset.iter_documents(split)]
    if not any(docs):
        raise UserError(f"dataset {dataset_dir} has no {split} documents")
    return docs


def _vocab_size(tokenizer) -> int:
    return int(getattr(tokenizer, "vocab_size", 1 << 62))
