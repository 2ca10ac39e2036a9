"""Exports: tiktoken and HF `tokenizers`/`transformers` give ids identical to ours."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import BPETokenizer, WordPieceTokenizer

tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")

TRICKY = [
    "👨\u200d👩\u200d👧\u200d👦 family", "👍🏽👍🏿", "漢字かな交じり文", "مرحبا بالعالم", "שָׁלוֹם",
    "e\u0301 n\u0303", "a\x00b", "x\r\ny\r\n\r\n", "  lots   of\t\tspace \n\n ", "don't I'LL 've",
    "1234567 12.5%", "<|endoftext|>", "😊", "\u00a0nbsp\u2003em", "ǅ ǈ ᾈ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def _docs(corpora_dir, limit_chars=400_000) -> list[str]:
    docs = []
    for path in sorted(corpora_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                # Several slices from each document, from different places in it.
                step = max(1, len(text) // 8)
                docs.extend(text[i : i + limit_chars // 32] for i in range(0, len(text), step))
                break
    return docs


@pytest.fixture(scope="module")
def shared_docs(corpora_dir):
    return _docs(corpora_dir)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tok(request, shared_docs):
    return BPETokenizer.train(shared_docs + TRICKY * 5, 1500, pattern=request.param,
                              progress=False, workers=1)


@pytest.fixture(scope="module")
def exports(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    tok.export_hf(out)
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    return tok.to_tiktoken(), hf, out


_text = st.lists(st.one_of(st.text(), st.sampled_from(TRICKY)), max_size=6).map("".join)


def test_tiktoken_and_hf_ids_identical_on_shared_corpora(tok, exports, shared_docs):
    tik, hf, _ = exports
    ours = tok.encode_batch(shared_docs)
    assert ours == tik.encode_ordinary_batch(shared_docs)
    assert ours == [e.ids for e in hf.encode_batch(shared_docs, add_special_tokens=False)]


@settings(max_examples=200, deadline=None)
@given(_text)
def test_tiktoken_and_hf_ids_identical_on_generated_strings(tok, exports, s):
    tik, hf, _ = exports
    ours = tok.encode(s)
    assert ours == tik.encode(s, disallowed_special=())
    # HF parses special-token strings by default, as we do with allowed_special="all".
    assert tok.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False).ids
    assert hf.decode(ours) == tok.decode(ours)


def test_special_tokens_agree_with_tiktoken_and_hf(tok, exports):
    tik, hf, _ = exports
    s = "one<|endoftext|>two"
    assert tok.encode(s, allowed_special="all") == tik.encode(s, allowed_special="all")
    assert tok.encode(s) == tik.encode(s, disallowed_special=())
    assert tok.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False).ids
    hf.encode_special_tokens = True  # HF's switch for "special strings are plain text"
    try:
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False


def test_transformers_loads_the_hf_export(tok, exports, shared_docs):
    transformers = pytest.importorskip("transformers")
    _, _, out = exports
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    for doc in shared_docs[:10] + TRICKY:
        assert fast(doc, add_special_tokens=False)["input_ids"] == tok.encode(doc, allowed_special="all")
    assert fast.eos_token == "<|endoftext|>"
    assert fast.convert_tokens_to_ids("<|endoftext|>") == tok.eot_id


def test_wordpiece_matches_its_hf_export(shared_docs, tmp_path):
    wp = WordPieceTokenizer.train(shared_docs[:6] + TRICKY, 450, progress=False)
    wp.export_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for doc in shared_docs[:30] + TRICKY + ["unseen ☃ zebra-quokka", "x" * 150]:
        ids = wp.encode(doc)
        assert ids == hf.encode(doc, add_special_tokens=False).ids
        assert wp.decode(ids) == hf.decode(ids, skip_special_tokens=False)
