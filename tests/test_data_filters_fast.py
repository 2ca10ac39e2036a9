"""The C fast path of the prose quality rules against the readable Python reference.

`filters._check_prose_fast` (statistics from `_fastfilters`) must take exactly the decisions of
`filters._check_prose` (the reference), and every statistic it computes must equal the same
number computed with plain str methods, the `regex` module and Counter: on the shared corpora
cut into documents of many sizes, and on hypothesis-generated text full of the cases that
differ between definitions (non-ASCII letters and spaces, U+001C-U+001F, characters whose
lower case is longer, astral letters, ellipses, bullets, blank and repeated lines), and on
generated ASCII text, which takes the C side's own path (lowered there, read 8 bytes at a
time: words around 8 and 16 bytes long, control characters, stop words in upper case).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.data import filters
from scratchlm.data.filters import FilterConfig, normalize_text

pytestmark = pytest.mark.skipif(filters._fastfilters is None,
                                reason="the C extension scratchlm.data._fastfilters is not built")

NO_LETTER_WORD = regex.compile(r"(?<!\S)[^\s\p{L}]+(?!\S)")


# -- the statistics, the slow obvious way ------------------------------------------------------
PHRASES = ("lorem ipsum",)


def oracle_stats(text: str, phrases=PHRASES) -> dict:
    lowered = text.lower()
    words = lowered.split()
    lines = [line for line in text.split("\n") if line]
    paragraphs = [p.strip() for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    framed = "\n" + text + "\n"
    return {
        "words": len(words), "word_chars": sum(map(len, words)),
        "longest_word": max(map(len, words), default=0),
        "stop_words": len(filters.STOP_WORDS.intersection(words)),
        "letterless_words": len(NO_LETTER_WORD.findall(text)),
        "symbols": text.count("#") + text.count("...") + text.count("…"),
        "bullet_lines": sum(framed.count("\n" + b) for b in filters.BULLETS),
        "ellipsis_lines": framed.count("...\n") + framed.count("…\n"),
        "lines": len(lines), "distinct_lines": len(set(lines)),
        "line_chars": sum(map(len, lines)), "distinct_line_chars": sum(map(len, set(lines))),
        "paragraphs": len(paragraphs), "distinct_paragraphs": len(set(paragraphs)),
        "paragraph_chars": sum(map(len, paragraphs)),
        "distinct_paragraph_chars": sum(map(len, set(paragraphs))),
        "phrase": any(phrase in lowered for phrase in phrases),
    }


def oracle_ngrams(words: list[str], n: int) -> tuple[int, int, int]:
    """(top count, chars of the longest top n-gram, chars covered by repeated occurrences)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0, 0, 0
    counts = Counter(grams)
    top = max(counts.values())
    top_chars = max(sum(map(len, g)) for g, c in counts.items() if c == top)
    seen, covered = set(), set()
    for i, gram in enumerate(grams):
        if gram in seen:
            covered.update(range(i, i + n))
        seen.add(gram)
    return top, top_chars, sum(len(words[i]) for i in covered)


def fast_ngrams(stats, n: int) -> tuple[int, int, int]:
    grams = filters._fastfilters.ngrams(stats.ids, stats.lengths)
    count, chars = grams.top(n)
    # the bound that lets the filter skip the count: at least the count of the top n-gram
    assert grams.count_bound(n) >= count, (n, grams.count_bound(n), count)
    return count, chars, grams.repeated_chars(n)


def assert_same_stats(text: str, ngram_sizes=(1, 2, 3, 5, 10)) -> None:
    stats = filters.prose_stats(text, PHRASES)
    expected = oracle_stats(text)
    assert {k: getattr(stats, k) for k in expected} == expected
    words = text.lower().split()
    assert len(stats.ids) == len(stats.lengths) == 4 * len(words)
    for n in ngram_sizes:
        assert fast_ngrams(stats, n) == oracle_ngrams(words, n), n


def assert_same_decisions(text: str, configs) -> None:
    for config in configs:
        assert filters._check_prose_fast(text, config) == filters._check_prose(text, config)


# -- documents cut from the shared corpora -----------------------------------------------------
@pytest.fixture(scope="module")
def corpus_documents(corpora_dir):
    """The whole corpora documents, plus ~400 cut from them: runs of 1-40 paragraphs, some
    with repeated or shuffled paragraphs so that the repetition rules fire too."""
    texts = []
    for path in sorted(corpora_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [normalize_text(json.loads(line)["text"]) for line in f]
    rng = random.Random(0)
    paragraphs = [p for t in texts for p in t.split("\n\n") if p.strip()]
    cut = []
    for _ in range(400):
        start = rng.randrange(len(paragraphs))
        run = paragraphs[start:start + rng.randint(1, 40)]
        if rng.random() < 0.3:
            run = run + rng.choices(run, k=rng.randint(1, len(run)))
            rng.shuffle(run)
        cut.append("\n\n".join(run))
    return texts, cut


def default_and_tight_configs(text: str) -> list[FilterConfig]:
    """The defaults, and each rule alone with its threshold at this text's own value, where
    an off-by-one in any statistic flips the decision."""
    s = oracle_stats(text)
    configs = [FilterConfig()]
    if not s["words"]:
        return configs
    off = FilterConfig.none()
    words, lines = s["words"], max(s["lines"], 1)
    for change in ({"min_words": words}, {"min_words": words + 1}, {"max_words": words - 1},
                   {"mean_word_length": (s["word_chars"] / words, 1e9)},
                   {"max_symbol_ratio": s["symbols"] / words},
                   {"max_symbol_ratio": max(0.0, (s["symbols"] - 1) / words)},
                   {"min_stop_words": s["stop_words"]}, {"min_stop_words": s["stop_words"] + 1},
                   {"min_alpha_words": 1 - s["letterless_words"] / words},
                   {"max_bullet_lines": s["bullet_lines"] / lines},
                   {"max_ellipsis_lines": max(0.0, (s["ellipsis_lines"] - 1) / lines)},
                   {"max_dup_lines": 0.0}, {"max_dup_line_chars": 0.0},
                   {"max_dup_paragraphs": 0.0}, {"max_dup_paragraph_chars": 0.0},
                   {"max_top_ngram_chars": {2: 0.01, 3: 0.01, 4: 0.01}},
                   {"max_dup_ngram_chars": {5: 0.0, 7: 0.01, 10: 0.001}}):
        configs.append(FilterConfig(**{**off.__dict__, **change}))
    return configs


def test_fast_path_is_the_default_when_built():
    text = "the cat and the dog " * 20
    assert filters.check_document(text, "prose", FilterConfig()) == \
        filters._check_prose_fast(text, FilterConfig())


def test_corpora_same_statistics(corpus_documents):
    texts, cut = corpus_documents
    for text in texts:  # whole plays and novels: n-grams by the vectorised reference below
        stats = filters.prose_stats(text, PHRASES)
        expected = oracle_stats(text)
        assert {k: getattr(stats, k) for k in expected} == expected
    for text in cut[:100]:
        assert_same_stats(text)


def test_corpora_same_decisions(corpus_documents):
    texts, cut = corpus_documents
    decisions = Counter()
    for text in texts + cut:
        fast = filters._check_prose_fast(text, FilterConfig())
        assert fast == filters._check_prose(text, FilterConfig())
        decisions[fast] += 1
    for text in cut[:40]:
        assert_same_decisions(text, default_and_tight_configs(text)[1:])
    assert decisions[None] and len(decisions) > 1  # both kept and removed documents were seen


# -- generated text ------------------------------------------------------------------------------
TOKENS = ["the", "The", "and", "of", "to", "be", "that", "with", "have", "cat", "sat", "dog",
          "Straße", "İstanbul", "ǅemal", "façade", "naïve", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u0558x", "日本語",
          "42", "3.14", "...", "…", "#", "#tag", "-", "•", "*", "–", "--", "(a)", "x...",
          "lorem", "ipsum", "!!", "a", "I"]
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n", "\n\n", "\n\n\n", "\t", " \n", "\n ", "\x1c",
              "\x1f", "\x85", "\xa0", "\u2028", "\u3000", "\r"]


@st.composite
def prose_like(draw):
    vocab = draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12, unique=True))
    pieces = []
    for _ in range(draw(st.integers(0, 160))):
        pieces.append(draw(st.sampled_from(vocab)))
        pieces.append(draw(st.sampled_from(SEPARATORS)))
    if draw(st.booleans()):  # repeated lines / paragraphs
        block = "".join(pieces[: draw(st.integers(0, len(pieces)))])
        pieces.append(block * draw(st.integers(1, 3)))
    return draw(st.sampled_from(["", "\n", "- ", " "])) + "".join(pieces)


@st.composite
def random_config(draw):
    unit = st.floats(0, 1, allow_nan=False)
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731 - a rule is on or off
    return FilterConfig(
        min_words=draw(maybe(st.integers(0, 60))), max_words=draw(maybe(st.integers(0, 400))),
        mean_word_length=draw(maybe(st.tuples(st.floats(0, 4), st.floats(3, 12)))),
        max_symbol_ratio=draw(maybe(unit)), min_stop_words=draw(maybe(st.integers(0, 8))),
        min_alpha_words=draw(maybe(unit)), max_bullet_lines=draw(maybe(unit)),
        max_ellipsis_lines=draw(maybe(unit)), max_dup_lines=draw(maybe(unit)),
        max_dup_line_chars=draw(maybe(unit)), max_dup_paragraphs=draw(maybe(unit)),
        max_dup_paragraph_chars=draw(maybe(unit)),
        max_top_ngram_chars=draw(maybe(st.dictionaries(st.integers(2, 5), unit, max_size=3))),
        max_dup_ngram_chars=draw(maybe(st.dictionaries(st.integers(2, 10), unit, max_size=6))),
        reject_phrases=draw(maybe(st.just(("lorem ipsum",)))))


@settings(max_examples=80, deadline=None)
@given(text=st.one_of(prose_like(), st.text(max_size=300)))
def test_generated_same_statistics(text):
    assert_same_stats(text, ngram_sizes=(2, 3, 4, 6))


@settings(max_examples=80, deadline=None)
@given(text=prose_like(), config=random_config())
def test_generated_same_decisions(text, config):
    assert_same_decisions(text, [config, FilterConfig()])


def test_tied_top_ngrams_count_the_longest():
    # "aa bb", "bb c" and "c d" all occur 3 times (12, 9 and 6 characters in all); the limit
    # lies between, so only the longest exceeds it. The reference used to pick among ties by
    # hash order, which differs from process to process (str hashes are salted).
    words = ("aa bb c d " * 3 + "x y z w v u t s r q p o n m l k j i h g f e").split()
    text = " ".join(words)
    limit = 10 / sum(map(len, words))
    config = FilterConfig(**{**FilterConfig.none().__dict__,
                             "max_top_ngram_chars": {2: limit}})
    assert filters._check_prose(text, config) == "max_top_2gram_chars"
    assert filters._check_prose_fast(text, config) == "max_top_2gram_chars"


# -- ASCII text, the C side's own path ---------------------------------------------------------
ASCII_TOKENS = ["the", "THE", "The", "and", "AND", "of", "to", "be", "that", "with", "have",
                "cat", "dog", "sat", "extraordinary", "abcdefgh", "abcdefghi", "ABCDEFGHIJKLMNOP",
                "abcdefghijklmnopq", "42", "3.14", "...", "....", "......", "#", "#tag", "x#y#",
                "-", "*", "--", "(a)", "x...", "lorem", "LOREM", "ipsum", "!!", "a", "I",
                "the\x00", "\x01", "a\x08b", "with\x7f", "{}", "@user", "Z", "[z]"]
ASCII_SEPARATORS = [" ", " ", " ", "  ", "\n", "\n", "\n\n", "\n\n\n", "\t", " \n", "\n ",
                    "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\n \n"]


@st.composite
def ascii_prose(draw):
    vocab = draw(st.lists(st.sampled_from(ASCII_TOKENS), min_size=1, max_size=14, unique=True))
    separators = draw(st.sampled_from([ASCII_SEPARATORS, [" ", "\n", "\n\n"]]))
    pieces = []
    for _ in range(draw(st.integers(0, 200))):
        pieces.append(draw(st.sampled_from(vocab)))
        pieces.append(draw(st.sampled_from(separators)))
    if draw(st.booleans()):  # repeated lines, paragraphs and n-grams
        block = "".join(pieces[: draw(st.integers(0, len(pieces)))])
        pieces.append(block * draw(st.integers(1, 3)))
    return draw(st.sampled_from(["", "\n", "- ", " ", "* "])) + "".join(pieces)


@settings(max_examples=120, deadline=None)
@given(text=st.one_of(ascii_prose(), st.text(st.characters(max_codepoint=127), max_size=300)))
def test_generated_ascii_same_statistics(text):
    assert text.isascii()
    assert_same_stats(text, ngram_sizes=(1, 2, 3, 4, 5, 7))


@settings(max_examples=80, deadline=None)
@given(text=ascii_prose(), config=random_config())
def test_generated_ascii_same_decisions(text, config):
    assert_same_decisions(text, [config, FilterConfig()])


@pytest.mark.parametrize("text", ["Lorem Ipsum dolor", "LOREM IPSUM", "lorem  ipsum",
                                  "Straße lorem ipsum", "no such words", ""])
@pytest.mark.parametrize("phrases", [(), ("lorem ipsum",), ("Lorem Ipsum",), ("",),
                                     ("straße",), ("dolor", "lorem ipsum")])
def test_phrases_as_in_the_lowered_text(text, phrases):
    """A phrase counts as `phrase in text.lower()` does: as given (so upper case never matches),
    the empty phrase always, a non-ASCII one never in ASCII text."""
    expected = any(phrase in text.lower() for phrase in phrases)
    assert filters.prose_stats(text, phrases).phrase == expected


def test_ngrams_refuses_bad_input():
    ngrams = filters._fastfilters.ngrams
    with pytest.raises(ValueError):
        ngrams(b"\x00" * 8, b"\x00" * 4)  # ids and lengths of different counts
    with pytest.raises(ValueError):
        ngrams((5).to_bytes(4, "little"), (1).to_bytes(4, "little"))  # an id >= word count
    with pytest.raises(ValueError):
        ngrams(b"", b"").top(0)
    with pytest.raises(ValueError):
        ngrams(b"", b"").count_bound(0)
    assert ngrams(b"", b"").top(2) == (0, 0) and ngrams(b"", b"").repeated_chars(3) == 0
    assert ngrams(b"", b"").count_bound(1) == 0


def test_many_distinct_words_grow_the_word_set():
    """More distinct words than the C side's first guess (a word in 6 characters): the word
    set grows and rehashes; words of 3 letters and of 9-20 (two 8-byte loads) both."""
    rng = random.Random(3)
    letters = "abcdefghijklmnopqrstuvwxyz"
    short = rng.sample([a + b + c for a in letters for b in letters for c in letters], 12000)
    long = ["".join(rng.choices(letters, k=rng.randint(9, 20))) for _ in range(300)]
    words = short + long + short[:200] + long[:50] + ["The", "OF", "and"]
    rng.shuffle(words)
    text = " ".join(words)
    assert len(set(text.lower().split())) > len(text) / 5  # the table starts at ~n/4 slots
    assert_same_stats(text, ngram_sizes=(1, 2, 5))
