"""Byte-level BPE: round trips, the byte layout, training rules, C == Python, files, errors."""

from __future__ import annotations

import json
import pickle
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import UserError
from scratchlm.tokenizer import BPETokenizer, load_tokenizer
from scratchlm.tokenizer import merging, parallel
from scratchlm.tokenizer.merging import ChunkEncoder, learn_merges
from scratchlm.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, split_text

# Text with the scripts and sequences that trip tokenizers up.
TRICKY = [
    "👨\u200d👩\u200d👧\u200d👦 family", "👍🏽👍🏿 thumbs", "🏳️\u200d🌈", "漢字かな交じり文 中文",
    "مرحبا بالعالم", "שָׁלוֹם עולם", "e\u0301 cafe\u0301 n\u0303", "a\x00b\x00", "line\r\nnext\r\n",
    "tabs\tand  spaces   ", "don't I'LL we've", "12345678 3.14159", "<|endoftext|>",
    "😊😊😊", "\u202eRTL override", "🇫🇷🇯🇵",
]


def _sample_text() -> str:
    """A few hundred KB of mixed text that needs nothing from outside the repo."""
    from scratchlm.data.sources import iter_texts

    texts, size = [], 0
    for t in iter_texts("builtin:python-stdlib"):
        texts.append(t)
        size += len(t)
        if size > 300_000:
            break
    return "\n".join(texts + TRICKY * 20)


@pytest.fixture(scope="module")
def text() -> str:
    return _sample_text()


@pytest.fixture(scope="module")
def tok(text) -> BPETokenizer:
    return BPETokenizer.train([text], 1200, progress=False, workers=1)


# ----------------------------------------------------------------------------- bytes and ids


def test_emoji_is_four_bytes_before_any_merge():
    bare = BPETokenizer.train(["hello"], 257, progress=False, workers=1)
    assert bare.vocab_size == 257 and bare.eot_id == 256
    ids = bare.encode("😊")
    assert ids == [0xF0, 0x9F, 0x98, 0x8A]
    assert [bare.token_bytes(i) for i in ids] == [b"\xf0", b"\x9f", b"\x98", b"\x8a"]


def test_first_256_ids_are_the_bytes(tok):
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert len(set(tok.vocab)) == len(tok.vocab)  # every token has distinct bytes
    # Every merged token is two earlier tokens joined (learned order = id order).
    for a, b, new in tok.merges:
        assert tok.vocab[new] == tok.vocab[a] + tok.vocab[b]
        assert a < new and b < new


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(TRICKY)), max_size=6).map("".join))
def test_round_trip_any_text(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=20))
def test_lone_surrogates_round_trip_as_documented(tok, s):
    # Documented rule: surrogates are encoded with `surrogatepass`; decode_bytes is exact,
    # decode replaces them like any invalid UTF-8.
    ids = tok.encode(s)
    assert tok.decode_bytes(ids).decode("utf-8", "surrogatepass") == s
    assert tok.decode(ids) == s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def test_special_tokens_are_text_unless_allowed(tok):
    s = "a<|endoftext|>b"
    plain = tok.encode(s)
    assert tok.eot_id not in plain and tok.decode(plain) == s
    parsed = tok.encode(s, allowed_special="all")
    assert parsed.count(tok.eot_id) == 1 and tok.decode(parsed) == s
    assert tok.encode(s, allowed_special={"<|endoftext|>"}) == parsed
    with pytest.raises(UserError):
        tok.encode(s, allowed_special={"<|nope|>"})


def test_add_special_tokens_appends_ids(tok, tmp_path):
    t = BPETokenizer.load(tok.save(tmp_path))
    before = t.vocab_size
    ids = t.add_special_tokens(["<|user|>", "<|assistant|>", "<|user|>"])
    assert ids == [before, before + 1, before]
    assert t.vocab_size == before + 2
    assert t.encode("<|user|>hi", allowed_special="all")[0] == before
    assert t.fingerprint != tok.fingerprint


def test_encode_batch_matches_encode_in_workers(tok, text, monkeypatch):
    monkeypatch.setattr(parallel, "SERIAL_BELOW_CHARS", 0)  # force worker processes
    docs = [text[i : i + 5000] for i in range(0, 200_000, 5000)] + TRICKY
    t = pickle.loads(pickle.dumps(tok))  # a copy of its own, so the pool is this test's
    assert t.fingerprint == tok.fingerprint
    try:
        assert t.encode_batch(docs, workers=2) == [tok.encode(d) for d in docs]
        pool = t._worker_pool[2]
        assert t.encode_batch(docs[:3], workers=2) == [tok.encode(d) for d in docs[:3]]
        assert t._worker_pool[2] is pool  # reused, caches warm
        new_id = t.add_special_tokens(["<|sep|>"])[0]
        marked = [d + "<|sep|>" for d in docs]
        assert [ids[-1] for ids in t.encode_batch(marked, allowed_special="all", workers=2)] == \
            [new_id] * len(docs)  # the workers know the new special token
    finally:
        parallel.close_pool(t)


def test_long_run_of_one_character_is_encoded_without_blowing_up(tok):
    # 1M identical characters are one chunk; the heap path keeps this O(n log n).
    s = "a" * 1_000_000
    ids = tok.encode(s)
    assert tok.decode(ids) == s


# ----------------------------------------------------------------------------- training


def test_training_is_deterministic_and_worker_count_does_not_matter(text, monkeypatch):
    from scratchlm.tokenizer import counting

    docs = [text[i : i + 20_000] for i in range(0, len(text), 20_000)]
    a = BPETokenizer.train(docs, 600, progress=False, workers=1)
    monkeypatch.setattr(counting, "BATCH_CHARS", 30_000)  # many batches, spread over workers
    b = BPETokenizer.train(docs, 600, progress=False, workers=2)
    c = BPETokenizer.train(iter(docs), 600, progress=False, workers=3)
    assert a.fingerprint == b.fingerprint == c.fingerprint


def test_python_fallback_is_used_without_the_extension(text, monkeypatch):
    with_ext = BPETokenizer.train([text[:100_000]], 500, progress=False, workers=1)
    from scratchlm.tokenizer import patterns

    monkeypatch.setattr(merging, "_fastbpe", None)
    monkeypatch.setattr(patterns, "_fastbpe", None)
    assert not merging.have_extension() and not patterns.fast_mode(patterns.GPT4_PATTERN)
    without = BPETokenizer.train([text[:100_000]], 500, progress=False, workers=1)
    assert without._encoder._native is None
    assert without.fingerprint == with_ext.fingerprint
    assert without.encode(text[:5000]) == with_ext.encode(text[:5000])


def test_training_counts_each_chunk_and_merges_the_most_frequent_pair_first():
    tok = BPETokenizer.train(["ab ab ab cd"], 258, progress=False, workers=1, special_tokens=())
    # Chunks: "ab" x1, " ab" x2, " cd" x1 -> pair (a, b) occurs 3 times, the most.
    assert tok.vocab[256] == b"ab"


def test_ties_go_to_the_smallest_pair():
    tok = BPETokenizer.train(["xy ba"], 257, progress=False, workers=1, special_tokens=(),
                             pattern="none")
    # Pairs xy, "y ", " b", ba each occur once: the smallest (left, right) ids win: (32, 98).
    assert tok.vocab[256] == b" b"


def test_max_bytes_limits_the_sample(text):
    tok = BPETokenizer.train([text], 400, progress=False, workers=1, max_bytes=10_000)
    assert tok.training_bytes <= 10_000


def test_patterns_split_without_losing_text():
    for pattern in (GPT2_PATTERN, GPT4_PATTERN, r"\d+", "none"):
        for s in TRICKY:
            assert "".join(split_text(s, pattern)) == s
    assert split_text("ab12cd", r"\d+") == ["ab", "12", "cd"]


def _words(text):
    counts = Counter(split_text(text, GPT4_PATTERN))
    return [w.encode("utf-8", "surrogatepass") for w in counts], list(counts.values())


needs_extension = pytest.mark.skipif(not merging.have_extension(), reason="C extension not built")


@needs_extension
def test_c_extension_learns_the_same_merges_as_python(text):
    words, counts = _words(text[:150_000])
    assert learn_merges(words, counts, 900, use_extension=True) == \
        learn_merges(words, counts, 900, use_extension=False)


@needs_extension
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=10).map(lambda b: bytes(x % 3 + 97 for x in b)),
                          st.integers(1, 5)), min_size=1, max_size=25))
def test_c_extension_equals_python_on_small_alphabets(pairs):
    # A three-letter alphabet makes repeated runs and pairs that spell an existing token.
    words = list(dict(pairs))
    counts = [dict(pairs)[w] for w in words]
    assert learn_merges(words, counts, 320, use_extension=True) == \
        learn_merges(words, counts, 320, use_extension=False)


@needs_extension
def test_c_extension_encodes_the_same_ids_as_python(tok, text):
    native, python = ChunkEncoder(tok.vocab, use_extension=True), ChunkEncoder(tok.vocab, use_extension=False)
    chunks = split_text(text, tok.pattern) + TRICKY
    assert native.encode_chunks(chunks) == python.encode_chunks(chunks)
    rng = random.Random(0)
    for n in (0, 1, 5, 47, 48, 49, 200, 3000):  # both sides of the short/long switch
        piece = bytes(rng.choice(b"ab c\xf0") for _ in range(n)) if n else b""
        if piece:
            assert native.encode_bytes(piece) == python.encode_bytes(piece)


def test_scan_and_heap_merging_agree(tok):
    enc = ChunkEncoder(tok.vocab, use_extension=False)
    rng = random.Random(1)
    for _ in range(200):
        piece = list(bytes(rng.choice(b"abcde _") for _ in range(rng.randint(2, 120))))
        assert merging._merge_by_scan(list(piece), enc.table) == merging._merge_by_heap(list(piece), enc.table)


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip_keeps_fingerprint_and_ids(tok, tmp_path, text):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(text[:20000]) == tok.encode(text[:20000])
    assert loaded.special_tokens == tok.special_tokens


@pytest.mark.parametrize("breakage", [
    lambda d: "{not json",
    lambda d: json.dumps({**d, "type": "mystery"}),
    lambda d: json.dumps({**d, "vocab": d["vocab"][1:]}),
    lambda d: json.dumps({**d, "vocab": d["vocab"][:300] + ["\u4e00"]}),
    lambda d: json.dumps({**d, "special_tokens": {"<|endoftext|>": 3}}),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "pattern"}),
])
def test_broken_tokenizer_json_is_a_user_error(tok, tmp_path, breakage):
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(breakage(data))
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_training_input_is_a_user_error():
    with pytest.raises(UserError, match="too small"):
        BPETokenizer.train(["abc"], 256, progress=False)
    with pytest.raises(UserError, match="empty"):
        BPETokenizer.train(["", ""], 300, progress=False, workers=1)
    with pytest.raises(UserError, match="not found"):
        load_tokenizer("/nonexistent/tokenizer/dir")


# ----------------------------------------------------------------------------- C scanners


def _probe_chars() -> list[str]:
    # Every code point below U+0800 (ASCII, Latin, the apostrophe cases, most spaces), every
    # 89th above it, and the odd ones: Unicode spaces, the long s that folds to "s", surrogates.
    odd = [0x17F, 0x212A, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0x85, 0xD800, 0xDFFF]
    odd += list(range(0x2000, 0x200D))
    return [chr(c) for c in sorted(set(range(0x800)) | set(range(0x800, 0x110000, 89)) | set(odd))]


@needs_extension
@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN])
def test_c_scanner_splits_exactly_like_regex(pattern, text):
    import regex

    from scratchlm.tokenizer.patterns import _fastbpe, fast_mode

    mode, compiled = fast_mode(pattern), regex.compile(pattern)
    assert mode
    chars = _probe_chars()
    for template in ("'{}", "'{}e", " {}", "{}a", "{} ", "{}\n", "1{}2", " {}{}", "\r{}", "{}  x"):
        s = "|".join(template.replace("{}", c) for c in chars)
        assert _fastbpe.split(s, mode) == compiled.findall(s), template
    assert _fastbpe.split(text, mode) == compiled.findall(text)


@needs_extension
@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("aZ1 \t\n\r'sSdlLvVeErRtTmM.!-_😊漢\u0301\u00a0\u2003\x00ſ٣\ud800")),
               max_size=16))
def test_c_scanner_matches_regex_on_generated_strings(s):
    import regex

    from scratchlm.tokenizer.patterns import _fastbpe, fast_mode

    for pattern in (GPT4_PATTERN, GPT2_PATTERN):
        assert _fastbpe.split(s, fast_mode(pattern)) == regex.findall(pattern, s)
