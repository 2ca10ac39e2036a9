"""Token byte strings as JSON-friendly text, and exports to other libraries' formats.

Tokens are raw bytes, which JSON cannot hold, so `tokenizer.json` writes each byte as one
printable character using GPT-2's byte-level alphabet (printable ASCII and Latin-1 stand for
themselves, the other bytes map to U+0100 and up; a space is `Ġ`). The same alphabet is what
HF's ByteLevel components use, so the HF export can reuse our vocabulary strings as they are.

Exports: `export_hf_bpe` (a `tokenizers` JSON: our split regex as a `Split` pre-tokenizer,
then `ByteLevel` without its own regex, a BPE model whose merges are every split of every token
ranked by the token's id, and `ignore_merges` so a chunk that is a token stays whole, which is
exactly the encoding rule of `merging.py`), and `to_tiktoken` (an `Encoding` built offline from
the ranks). Not for reading other libraries' files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_json


@functools.lru_cache(maxsize=1)
def byte_to_char() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: byte value -> the printable character that stands for it."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # bytes that would be invisible or whitespace get code points from U+0100 up
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


@functools.lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_to_char())}


def bytes_to_text(token: bytes) -> str:
    table = byte_to_char()
    return "".join(table[b] for b in token)


def text_to_bytes(text: str, where: str) -> bytes:
    """Inverse of `bytes_to_text`; `where` names the file and field for the error message."""
    table = char_to_byte()
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise UserError(f"{where}: {e.args[0]!r} is not a byte-level character") from None


# ----------------------------------------------------------------------------- HF tokenizers


def hf_merges(vocab: Sequence[bytes]) -> list[list[str]]:
    """Every (left, right) split of every token into two tokens, ordered by the token's id."""
    id_of = {b: i for i, b in enumerate(vocab)}
    merges = []
    for token_id in range(256, len(vocab)):
        token = vocab[token_id]
        for cut in range(1, len(token)):
            if token[:cut] in id_of and token[cut:] in id_of:
                merges.append([bytes_to_text(token[:cut]), bytes_to_text(token[cut:])])
    return merges


def hf_bpe_json(vocab: Sequence[bytes], pattern_str: str, special_tokens: dict[str, int]) -> dict:
    """A `tokenizers` JSON document that encodes exactly as our BPETokenizer does."""
    from scratchlm.tokenizer.patterns import NO_SPLIT

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    if pattern_str == NO_SPLIT:
        pre_tokenizer = byte_level
    else:
        split = {"type": "Split", "pattern": {"Regex": pattern_str}, "behavior": "Isolated",
                 "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {bytes_to_text(b): i for i, b in enumerate(vocab)},
            "merges": hf_merges(vocab),
        },
    }


def export_hf_bpe(out_dir, vocab, pattern_str, special_tokens, eot: str | None) -> Path:
    """Write `tokenizer.json` (+ a minimal `tokenizer_config.json`) loadable by HF libraries."""
    out = Path(out_dir)
    atomic_write_json(out / "tokenizer.json", hf_bpe_json(vocab, pattern_str, special_tokens))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000}
    if eot is not None:
        config.update(bos_token=eot, eos_token=eot, unk_token=None)
    atomic_write_json(out / "tokenizer_config.json", config)
    return out / "tokenizer.json"


# ----------------------------------------------------------------------------- tiktoken


def to_tiktoken(vocab: Sequence[bytes], pattern_str: str, special_tokens: dict[str, int],
                name: str = "scratchlm"):
    """A `tiktoken.Encoding` with our ranks (token id = rank), built without any download."""
    import tiktoken

    from scratchlm.tokenizer.patterns import NO_SPLIT

    if pattern_str == NO_SPLIT:
        pattern_str = r"[\s\S]+"  # one chunk: the whole text
    ranks = {b: i for i, b in enumerate(vocab)}
    return tiktoken.Encoding(name, pat_str=pattern_str, mergeable_ranks=ranks,
                             special_tokens=dict(special_tokens))
