"""What `tokenizer show` and `tokenizer stats` print: token boundaries, bytes, corpus figures.

Meant for a learner looking at a tokenizer: every token appears with its id, its raw bytes in
hex and its text (bytes that are not a whole UTF-8 character shown as `\\xNN`), so one sees
😊 become `\\xf0\\x9f\\x98\\x8a` pieces until merges join them. Not for encoding itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable


def token_text(token: bytes) -> str:
    """Printable form of a token: valid UTF-8 as text (with escapes for control characters)."""
    text = token.decode("utf-8", errors="backslashreplace")
    return text.encode("unicode_escape", "backslashreplace").decode("ascii").replace("\\\\x", "\\x") \
        if not text.isprintable() else text


def _token_bytes(tok, token_id: int) -> bytes:
    if hasattr(tok, "token_bytes"):
        return tok.token_bytes(token_id)
    return tok.vocab[token_id].encode("utf-8")


def show_tokens(tok, text: str) -> str:
    ids = tok.encode(text)
    pieces = [_token_bytes(tok, i) for i in ids]
    lines = ["|" + "|".join(token_text(p) for p in pieces) + "|", ""]
    lines.append(f"{len(ids)} tokens, {len(text.encode('utf-8', 'surrogatepass'))} bytes")
    lines.append(f"{'id':>8}  {'bytes':<24}  text")
    for i, piece in zip(ids, pieces):
        hexed = " ".join(f"{b:02x}" for b in piece)
        lines.append(f"{i:>8}  {hexed:<24}  '{token_text(piece)}'")
    return "\n".join(lines)


@dataclass
class CorpusStats:
    documents: int
    bytes: int
    tokens: int
    distinct_ids: int
    vocab_size: int
    top: list[tuple[int, int]]

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


def corpus_stats(tok, texts: Iterable[str], max_bytes: int | None = None, top: int = 20) -> CorpusStats:
    counts: Counter = Counter()
    docs = n_bytes = n_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        counts.update(ids)
        docs += 1
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
        n_tokens += len(ids)
        if max_bytes is not None and n_bytes >= max_bytes:
            break
    return CorpusStats(docs, n_bytes, n_tokens, len(counts), tok.vocab_size, counts.most_common(top))


def format_stats(stats: CorpusStats, tok=None) -> str:
    lines = [
        f"documents        {stats.documents}",
        f"bytes            {stats.bytes}",
        f"tokens           {stats.tokens}",
        f"bytes per token  {stats.bytes_per_token:.3f}",
        f"vocabulary used  {stats.distinct_ids} of {stats.vocab_size} ids "
        f"({100 * stats.distinct_ids / max(stats.vocab_size, 1):.1f}%)",
        "most frequent ids: " + ", ".join(f"{i}×{c}" for i, c in stats.top[:10]),
    ]
    return "\n".join(lines)
