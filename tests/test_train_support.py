"""Helpers for the training tests: a tiny tokenizer and dataset dir built in a few tenths of a
second from the builtin Python-stdlib corpus (so the tests need nothing from ../shared).

Written with the dataset format's own `ShardWriter` and the index layout of docs/internals.md,
so these tests do not depend on the whole data pipeline (cleaning, dedup) being fast.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from scratchlm.data.shards import ShardWriter, dtype_for_vocab
from scratchlm.data.sources import iter_texts
from scratchlm.files import atomic_write_json
from scratchlm.tokenizer import BPETokenizer


def corpus_texts(max_chars: int = 200_000, skip: int = 0) -> list[str]:
    texts, total = [], 0
    for i, text in enumerate(iter_texts("builtin:python-stdlib")):
        if i < skip:
            continue
        texts.append(text[:60_000])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 300) -> BPETokenizer:
    return BPETokenizer.train(texts, vocab_size, progress=False)


def make_dataset(out: Path, tokenizer: BPETokenizer, texts: list[str], val_docs: int = 2) -> Path:
    """A dataset dir: `texts[:-val_docs]` as train, the rest as val; tokenizer saved alongside."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer")
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    records = []
    for split, docs in (("train", texts[:-val_docs]), ("val", texts[-val_docs:])):
        writer = ShardWriter(out, split, dtype, 1 << 16, tokenizer.eot_id)
        for doc in docs:
            writer.add_document(tokenizer.encode(doc))
        records += writer.close()
    atomic_write_json(out / "index.json", {
        "version": 1, "dtype": dtype, "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id, "tokenizer_sha256": tokenizer.fingerprint,
        "shards": records, "sources": [], "stats": {},
    })
    return out


def unigram_entropy(dataset_dir: Path, split: str = "train") -> float:
    """Entropy (nats/token) of the split's token frequencies: what a model without context gets."""
    from scratchlm.data.shards import Dataset

    tokens = Dataset.open(dataset_dir).tokens(split)
    counts = np.bincount(tokens.astype(np.int64)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine makes them crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Settings every tiny test run shares: fp32 (exact on any CPU), no bars, no TensorBoard.
TINY = [
    "train.seq_len=32", "train.micro_batch_size=8", "train.dtype=fp32", "train.progress=false",
    "train.tensorboard=false", "train.warmup_steps=5", "train.log_every=5", "train.eval_batches=2",
    "model.dropout=0.0",
]
