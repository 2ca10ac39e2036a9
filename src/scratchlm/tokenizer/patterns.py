"""Split patterns: the regexes that cut text into chunks before byte-pair merging.

BPE never merges across a chunk boundary, so the pattern decides what a token can span (a
leading space joins the word after it, digits come in groups of at most three with `gpt4`, and
so on). `gpt2` and `gpt4` (OpenAI's cl100k) are the named patterns; any other string is used as
a custom regex; `none` means the whole text is one chunk. Not for special tokens (see
`bpe.py`) or for anything about merges.

With the C extension built, the two named patterns run as hand-written scanners
(`_fastbpe.split`, several times faster than the regex engine and held to give exactly
`regex.findall`'s chunks by the tests); custom patterns always use `regex`.

The patterns are written so that Python's `regex`, Rust's `fancy_regex` (tiktoken) and
Oniguruma (HF tokenizers) all cut text identically: no `$` anchors, whose meaning differs
between those engines.
"""

from __future__ import annotations

import functools

import regex

from scratchlm.errors import UserError

FASTBPE_VERSION = 2  # the interface version of _fastbpe.c this code expects

try:  # the optional C extension (see merging.py), built by setup.py; pure Python without it
    from scratchlm.tokenizer import _fastbpe

    if getattr(_fastbpe, "VERSION", None) != FASTBPE_VERSION:  # a stale build: do not trust it
        _fastbpe = None
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastbpe = None

GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
NAMED_PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "cl100k": GPT4_PATTERN}
NO_SPLIT = "none"
# Scanner numbers in the C extension for the named patterns.
FAST_MODES = {GPT4_PATTERN: 1, GPT2_PATTERN: 2}


def resolve_pattern(pattern: str | None) -> str:
    """A named pattern's regex, `none` for no split, or the custom regex itself (checked)."""
    if pattern is None or pattern == NO_SPLIT:
        return NO_SPLIT
    if pattern in NAMED_PATTERNS:
        return NAMED_PATTERNS[pattern]
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise UserError(f"split pattern is not a valid regex ({e}): {pattern!r}") from None
    return pattern


def pattern_name(pattern_str: str) -> str | None:
    """The short name of a resolved pattern, if it has one (for display only)."""
    if pattern_str == NO_SPLIT:
        return NO_SPLIT
    for name, value in NAMED_PATTERNS.items():
        if value == pattern_str:
            return name
    return None


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern_str: str):
    """The compiled regex for a resolved pattern, or None when there is no split."""
    if pattern_str == NO_SPLIT:
        return None
    return regex.compile(pattern_str)


def covers_everything(pattern_str: str) -> bool:
    """True for the named patterns, which match every character (so `findall` loses nothing)."""
    return pattern_str in NAMED_PATTERNS.values()


def fast_mode(pattern_str: str) -> int:
    """The C scanner for this pattern (0: none, use `regex`); loads its class table once."""
    mode = FAST_MODES.get(pattern_str, 0)
    if mode and _fastbpe is not None:
        _load_class_table()
        return mode
    return 0


@functools.lru_cache(maxsize=1)
def _load_class_table() -> None:
    # \p{L}, \p{N} and \s exactly as the `regex` module sees them, for every code point.
    every_char = "".join(map(chr, range(0x110000)))
    table = bytearray(0x110000)
    for bit, cls in ((1, r"\p{L}"), (2, r"\p{N}"), (4, r"\s")):
        for ch in regex.findall(cls, every_char):
            table[ord(ch)] |= bit
    _fastbpe.set_classes(bytes(table))


def split_text(text: str, pattern_str: str) -> list[str]:
    """The chunks of `text` under a resolved pattern, in order; they concatenate back to `text`.

    Text a custom pattern does not match is kept as chunks of its own (as HF's `Split` with
    behavior "isolated" does), so no character is ever dropped.
    """
    mode = fast_mode(pattern_str)
    if mode:
        return _fastbpe.split(text, mode)
    compiled = compile_pattern(pattern_str)
    if compiled is None:
        return [text] if text else []
    if covers_everything(pattern_str):
        return compiled.findall(text)
    chunks, end = [], 0
    for m in compiled.finditer(text):
        if m.start() > end:
            chunks.append(text[end : m.start()])
        if m.end() > m.start():
            chunks.append(m.group())
        end = m.end()
    if end < len(text):
        chunks.append(text[end:])
    return chunks
