"""Exact and near-duplicate detection: content hashes, and MinHash with LSH written on numpy.

Exact: two documents are duplicates when their normalised texts have the same 128-bit BLAKE2b
digest (`text_key`). Near: a document's shingles are its word n-grams (lower-cased `\\w+`
words, `ngram` of them); its MinHash signature is, for each of `bands * rows` hash functions
`h(x) = (a*x + b) mod 2^64 >> 32` (multiply-shift, random odd `a`), the minimum over its
shingles, so two signatures agree at one position with probability equal to the Jaccard
similarity `s` of the shingle sets. LSH cuts the signature into `bands` bands of `rows` values;
two documents become candidates when any band is identical, which happens with probability

    P(candidate | s) = 1 - (1 - s^rows)^bands        (the LSH "S-curve")

and a candidate is a duplicate when the fraction of agreeing signature values reaches
`threshold`. With the defaults (5-grams, 32 bands x 4 rows = 128 hashes, threshold 0.5):

    s      0.2    0.3    0.4    0.5    0.6    0.7    0.8    0.9
    P      0.050  0.229  0.563  0.873  0.985  0.9996 ~1     ~1

A document with 5% of its words changed at random keeps about 0.95^5 = 77% of its 5-grams,
s ~ 0.77 / 1.23 = 0.63, found with probability ~0.99; unrelated prose has s < 0.05. Memory: the
index keeps, per kept document, one signature (128 x 4 bytes) and `bands` dictionary entries
(about 2.7 KB in all with the defaults).
Not for deciding what to keep when (that is the pipeline's job: the first copy wins).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import regex

from scratchlm.errors import UserError

DEDUP_MODES = ("none", "exact", "minhash")
WORD = regex.compile(r"\w+")  # the words of shingles and decontamination n-grams
_CACHE_LIMIT = 1 << 20
_word_cache: dict[str, int] = {}
# Fixed odd multipliers that fold word hashes into n-gram hashes (position-dependent).
_FOLD = np.random.default_rng(0x5EED).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)


def text_key(text: str) -> bytes:
    """128-bit digest of a (normalised) text: the identity of a document for exact dedup."""
    return utf8_key(text.encode("utf-8", errors="surrogatepass"))


def utf8_key(encoded: bytes) -> bytes:
    """`text_key` of a text already encoded (the pipeline encodes once for size and key)."""
    return hashlib.blake2b(encoded, digest_size=16).digest()


def _stable_word_hash(word: str) -> int:
    # Python's hash() differs between processes; workers and the main process must agree.
    h = int.from_bytes(hashlib.blake2b(word.encode("utf-8", errors="surrogatepass"),
                                       digest_size=8).digest(), "little")
    if len(_word_cache) >= _CACHE_LIMIT:
        _word_cache.clear()
    _word_cache[word] = h
    return h


def word_hashes(text: str) -> np.ndarray:
    """A stable 64-bit hash per lower-cased `\\w+` word of `text`, in order."""
    words = WORD.findall(text.lower())
    cache = _word_cache
    return np.fromiter((cache.get(w) or _stable_word_hash(w) for w in words),
                       dtype=np.uint64, count=len(words))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per run of n consecutive word hashes (empty when fewer than n words)."""
    if n > _FOLD.size:
        raise UserError(f"n-gram size {n} is larger than {_FOLD.size}")
    count = hashes.size - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        out += hashes[k:k + count] * _FOLD[k]
    return out


@dataclass
class MinHashConfig:
    """MinHash + LSH settings; see the module docstring for what they mean for recall."""

    ngram: int = 5
    bands: int = 32
    rows: int = 4
    threshold: float = 0.5
    seed: int = 1

    def __post_init__(self):
        for name in ("ngram", "bands", "rows"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"minhash {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.threshold <= 1:
            raise UserError(f"minhash threshold must be in (0, 1], got {self.threshold}")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def candidate_probability(self, similarity: float) -> float:
        """The S-curve: chance that two documents of this Jaccard similarity share a band."""
        return 1.0 - (1.0 - similarity ** self.rows) ** self.bands

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MinHashConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown minhash setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)


class MinHasher:
    """Computes signatures; the same config gives the same signatures in every process."""

    def __init__(self, config: MinHashConfig, block_rows: int = 4096):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self._a = rng.integers(1, 2**63, size=config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=config.num_perm, dtype=np.uint64)
        self._block_rows = block_rows

    def shingles(self, text: str) -> np.ndarray:
        hashes = word_hashes(text)
        shingles = ngram_hashes(hashes, self.config.ngram)
        if shingles.size == 0 and hashes.size:
            shingles = ngram_hashes(hashes, hashes.size)  # shorter than one n-gram: whole text
        return np.unique(shingles)

    def signature(self, text: str) -> np.ndarray:
        """uint32 [num_perm]: the minimum of each hash function over the text's shingles."""
        shingles = self.shingles(text)
        signature = np.full(self.config.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        shift = np.uint64(32)
        for start in range(0, shingles.size, self._block_rows):
            block = shingles[start:start + self._block_rows, None]
            values = ((block * self._a + self._b) >> shift).astype(np.uint32)
            np.minimum(signature, values.min(axis=0), out=signature)
        return signature


class LSHIndex:
    """Signatures of kept documents, bucketed by band, for near-duplicate queries."""

    def __init__(self, config: MinHashConfig):
        self.config = config
        self._buckets: list[dict[int, int]] = [{} for _ in range(config.bands)]
        self._signatures: list[np.ndarray] = []
        self._fold = _FOLD[:config.rows]

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature.reshape(self.config.bands, self.config.rows).astype(np.uint64)
        return (bands * self._fold).sum(axis=1, dtype=np.uint64).tolist()

    def find(self, signature: np.ndarray) -> int | None:
        """The slot of an indexed document this one duplicates (estimated Jaccard >= threshold)."""
        seen = set()
        for bucket, key in zip(self._buckets, self._band_keys(signature)):
            slot = bucket.get(key)
            if slot is None or slot in seen:
                continue
            seen.add(slot)
            agreement = float(np.mean(self._signatures[slot] == signature))
            if agreement >= self.config.threshold:
                return slot
        return None

    def add(self, signature: np.ndarray) -> int:
        slot = len(self._signatures)
        self._signatures.append(signature)
        for bucket, key in zip(self._buckets, self._band_keys(signature)):
            bucket.setdefault(key, slot)
        return slot

    def __len__(self) -> int:
        return len(self._signatures)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def jaccard(text_a: str, text_b: str, ngram: int = 5) -> float:
    """The exact Jaccard similarity of two texts' word n-gram sets (tests and reports)."""
    a = set(ngram_hashes(word_hashes(text_a), ngram).tolist())
    b = set(ngram_hashes(word_hashes(text_b), ngram).tolist())
    return len(a & b) / len(a | b) if a | b else 1.0
