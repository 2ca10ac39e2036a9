"""Bits per byte: equals total loss in bits over total UTF-8 bytes, computed independently, for
short and long documents, text sources and dataset dirs; every token is scored exactly once."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.eval import bpb as B
from scratchlm.eval.toy import EOT_ID, BigramModel, ByteTokenizer, PrefixMeanModel

TOK = ByteTokenizer()


def corpus_texts(corpora_dir, n: int, max_chars: int) -> list[str]:
    path = sorted(corpora_dir.glob("*.jsonl"))[0]
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            for start in range(0, len(text), max_chars):  # a few long books: cut them up
                texts.append(text[start : start + max_chars])
                if len(texts) == n:
                    return texts
    return texts


def trained_bigram(texts: list[str]) -> torch.Tensor:
    """A bigram model trained by counting (the maximum-likelihood fit, add-one smoothed)."""
    counts = torch.ones(257, 257)
    for text in texts:
        seq = [EOT_ID] + list(text.encode()) + [EOT_ID]
        for a, b in zip(seq, seq[1:]):
            counts[a, b] += 1
    return counts.log()


def test_bpb_of_trained_bigram_long_documents(corpora_dir):
    train = corpus_texts(corpora_dir, 20, 2000)
    held_out = ["Ünïcödé — text, " * 5, *corpus_texts(corpora_dir, 23, 300)[20:]]
    table = trained_bigram(train)
    logprobs = torch.log_softmax(table.double(), dim=-1).tolist()
    nats, n_bytes = 0.0, 0
    for text in held_out:  # independent: each byte after its predecessor, the first after EOT
        seq = [EOT_ID] + list(text.encode("utf-8"))
        nats -= sum(logprobs[a][b] for a, b in zip(seq, seq[1:]))
        n_bytes += len(text.encode("utf-8"))
    # Window 32 << documents of hundreds of bytes: the sliding window is exercised.
    for stride in (None, 1, 7, 32):
        result = B.bits_per_byte_texts(BigramModel(table, max_seq_len=32), TOK, held_out, stride=stride)
        assert result.bytes == n_bytes and result.tokens == n_bytes and result.documents == len(held_out)
        assert result.bpb == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
        assert result.perplexity == pytest.approx(math.exp(nats / n_bytes), rel=1e-6)


def tiny_trained_transformer(texts, max_seq_len=24, steps=4):
    transformer = pytest.importorskip("scratchlm.model.transformer")
    from scratchlm.model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, d_model=32, max_seq_len=max_seq_len)
    model = transformer.Transformer(cfg)
    data = torch.tensor([EOT_ID] + list(" ".join(texts).encode())[:4000])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - max_seq_len - 1, (8,))
        x = torch.stack([data[s : s + max_seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + max_seq_len + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_bpb_of_trained_transformer_equals_loss_over_bytes(corpora_dir):
    texts = corpus_texts(corpora_dir, 12, 300)
    model = tiny_trained_transformer(texts)
    short = [t[:20] for t in texts[:6]] + ["é!"]  # fit in one window (24 tokens incl. EOT)
    total_loss, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in short:
            ids = torch.tensor([[EOT_ID] + list(text.encode())])
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0].double(), ids[0, 1:], reduction="sum")
            total_loss += float(loss)
            n_bytes += len(text.encode("utf-8"))
    result = B.bits_per_byte_texts(model, TOK, short)
    assert result.bpb == pytest.approx(total_loss / math.log(2) / n_bytes, rel=1e-5)


def test_stride_one_gives_each_token_all_the_context_that_fits(corpora_dir):
    model = tiny_trained_transformer(corpus_texts(corpora_dir, 4, 200), max_seq_len=12, steps=0)
    text = corpus_texts(corpora_dir, 1, 30)[0]
    full = [EOT_ID] + list(text.encode())
    expected = 0.0
    with torch.no_grad():
        for i in range(1, len(full)):  # token i after the last (up to) 12 tokens before it
            window = full[max(0, i - 12) : i]
            expected += float(torch.log_softmax(model(torch.tensor([window]))[0, -1].double(), -1)[full[i]])
    assert B.document_logprob(model, full[1:], EOT_ID, stride=1) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("n,window,stride", [(1, 4, 2), (5, 4, 2), (50, 8, 3), (17, 16, 16), (16, 16, 1)])
def test_rolling_windows_score_every_token_once(n, window, stride):
    tokens = list(range(100, 100 + n))
    requests = B.rolling_requests(tokens, 0, window, stride)
    scored = [t for r in requests for t in r.continuation]
    assert scored == tokens
    for r in requests:
        assert 1 <= len(r.context) and len(r.context) + len(r.continuation) <= window + 1
        # context is exactly the text before the scored tokens
        full = [0] + tokens
        start = full.index(r.continuation[0])
        assert list(r.context) == full[start - len(r.context) : start]
        if r is not requests[0]:
            assert len(r.context) >= min(start, window - stride)


def test_bpb_of_dataset_dir_and_text_source(tmp_path, corpora_dir):
    from scratchlm.data.shards import Dataset, prepare_dataset
    from scratchlm.tokenizer import BPETokenizer

    texts = corpus_texts(corpora_dir, 30, 400)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = BPETokenizer.train(texts, vocab_size=300, progress=False)
    prepare_dataset(str(src), tok, tmp_path / "data", filters="none", dedup="none", val_fraction=0.3, progress=False)
    val_docs = [d.tolist() for d in Dataset.open(tmp_path / "data").iter_documents("val")]
    assert val_docs
    model = PrefixMeanModel(vocab_size=tok.vocab_size, max_seq_len=64, seed=3)
    result = B.bits_per_byte(model, tok, str(tmp_path / "data"))
    val_texts = [tok.decode(d) for d in val_docs]
    assert result.bytes == sum(len(t.encode("utf-8")) for t in val_texts)
    assert result.bpb == pytest.approx(B.bits_per_byte_texts(model, tok, val_texts).bpb, rel=1e-6)
    # the same text as a plain source gives the same figure
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in val_texts))
    assert B.bits_per_byte(model, tok, str(tmp_path / "val.jsonl")).bpb == pytest.approx(result.bpb, rel=1e-6)
