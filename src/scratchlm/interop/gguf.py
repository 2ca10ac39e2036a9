"""Export a llama-architecture run to GGUF, the single-file format llama.cpp and its kin load.

What it is for: `export_gguf(run_dir, out_path, dtype)` writes the model with the metadata
llama.cpp's `llama` architecture reads, the tokenizer as a `gpt2`-type byte-level BPE (token
strings in GPT-2's byte alphabet, merges, token types), and the weights in F32, F16 or the
block formats Q8_0 / Q4_0 (encoded here; the `gguf` package only writes the container).

Two layout facts matter:
- Our RoPE rotates the two halves of each head (`rotate_half`, as HF Llama does); llama.cpp
  rotates adjacent pairs. q_proj / k_proj rows are permuted per head so that pair i of the
  interleaved layout holds rows i and i + head_dim/2 of ours (the permutation HF's converter
  applies; transformers' GGUF loader undoes it).
- GGUF shapes list the fastest dimension first, so a `[out, in]` weight is stored row-major as
  is and reads back as `(in, out)` in GGUF's notation.

Not for: other architectures (gpt2 / vaswani presets use LayerNorm, biases or learned
positions; they are refused with the reason), importing GGUF, or k-quants.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from scratchlm.errors import UserError

DTYPES = ("f32", "f16", "q8_0", "q4_0")
QK = 32  # values per Q8_0 / Q4_0 block


# ---------------------------------------------------------------------------------------------
# Block formats


def q8_0_encode(w: np.ndarray) -> np.ndarray:
    """Q8_0: blocks of 32 as an fp16 scale d = max|x| / 127 and 32 int8 codes (34 bytes)."""
    blocks = _blocks(w)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    codes = np.round(blocks * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), codes.view(np.uint8)], axis=1)
    return out.reshape(w.shape[0], -1)


def q4_0_encode(w: np.ndarray) -> np.ndarray:
    """Q4_0: blocks of 32 as an fp16 scale d and 16 bytes of 4-bit codes q, x = d * (q - 8).

    d = m / -8 where m is the value of largest magnitude (sign kept), so m itself is exact at
    code 0. Byte j holds value j in its low nibble and value j + 16 in its high nibble.
    """
    blocks = _blocks(w)
    idx = np.abs(blocks).argmax(axis=1)
    m = np.take_along_axis(blocks, idx[:, None], axis=1)
    d = m / -8.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    codes = np.clip(np.trunc(blocks * inv + 8.5), 0, 15).astype(np.uint8)
    packed = codes[:, : QK // 2] | (codes[:, QK // 2 :] << 4)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(w.shape[0], -1)


def _blocks(w: np.ndarray) -> np.ndarray:
    if w.ndim != 2 or w.shape[1] % QK:
        raise ValueError(f"block quantization needs rows that are a multiple of {QK}, got {w.shape}")
    return w.astype(np.float32).reshape(-1, QK)


# ---------------------------------------------------------------------------------------------
# Layout


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from rotate-half RoPE to llama.cpp's adjacent-pair RoPE.

    Within each head, output row r of the result is row (r // 2) + (r % 2) * head_dim / 2 of
    the input: the pairs (i, i + head_dim/2) become neighbours (2i, 2i + 1).
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_llama_architecture(cfg) -> None:
    """Raise a UserError unless the model is something llama.cpp's `llama` graph computes."""
    wanted = {
        "norm": "rmsnorm",
        "norm_position": "pre",
        "positions": "rope",
        "activation": "swiglu",
        "bias": False,
        "qk_norm": False,
        "scale_embeddings": False,
    }
    wrong = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if wrong:
        raise UserError("GGUF export supports the llama architecture only; this model has " + ", ".join(wrong))


def gguf_tensors(model, n_head: int, n_kv_head: int) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float tensor) for every weight, q/k permuted; quantized modules dequantized."""
    named = [("token_embd.weight", model.tok_embeddings.weight)]
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        named += [
            (p + "attn_norm.weight", layer.attn_norm.weight),
            (p + "attn_q.weight", permute_for_interleaved_rope(layer.attn.q_proj.weight, n_head)),
            (p + "attn_k.weight", permute_for_interleaved_rope(layer.attn.k_proj.weight, n_kv_head)),
            (p + "attn_v.weight", layer.attn.v_proj.weight),
            (p + "attn_output.weight", layer.attn.o_proj.weight),
            (p + "ffn_norm.weight", layer.mlp_norm.weight),
            (p + "ffn_gate.weight", layer.mlp.gate_proj.weight),
            (p + "ffn_up.weight", layer.mlp.up_proj.weight),
            (p + "ffn_down.weight", layer.mlp.down_proj.weight),
        ]
    named.append(("output_norm.weight", model.norm.weight))
    if not model.config.tie_embeddings:
        named.append(("output.weight", model.lm_head.weight))
    return [(name, t.detach().float().cpu()) for name, t in named]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_fields(tokenizer, n_vocab: int) -> dict:
    """Token strings, types and merges for a `gpt2`-type GGUF tokenizer of `n_vocab` entries."""
    from gguf import TokenType

    from scratchlm.tokenizer.formats import bytes_to_text, hf_merges
    from scratchlm.tokenizer.patterns import NAMED_PATTERNS

    vocab = list(tokenizer.vocab)
    tokens = [bytes_to_text(b) for b in vocab]
    types = [int(TokenType.NORMAL)] * len(tokens)
    by_id = {i: s for s, i in tokenizer.special_tokens.items()}
    if tokenizer.vocab_size > n_vocab:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {n_vocab} embeddings")
    for i in range(len(tokens), n_vocab):
        # ids past the byte-level vocabulary: special tokens, then unused padding rows
        tokens.append(by_id.get(i, f"<|unused_{i}|>"))
        types.append(int(TokenType.CONTROL if i in by_id else TokenType.UNUSED))
    # llama.cpp picks its pre-tokenizer regex by name; ours are close relatives of these
    pre = {NAMED_PATTERNS["gpt4"]: "llama-bpe", NAMED_PATTERNS["gpt2"]: "gpt-2"}.get(tokenizer.pattern, "default")
    return {
        "tokens": tokens,
        "types": types,
        "merges": [f"{a} {b}" for a, b in hf_merges(vocab)],
        "pre": pre,
        "eot_id": tokenizer.eot_id,
    }


# ---------------------------------------------------------------------------------------------
# The file


def export_gguf(run_dir, out_path, dtype: str = "f16", progress: bool = True) -> Path:
    """Write the run at `run_dir` as a GGUF file at `out_path`; returns the path."""
    import gguf

    from scratchlm.runs import load_run

    if dtype not in DTYPES:
        raise UserError(f"GGUF dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    run = load_run(run_dir)
    model, cfg = run.model, run.model.config
    check_llama_architecture(cfg)
    if run.tokenizer is None:
        raise UserError(f"{run_dir}: no tokenizer/ in the run dir; GGUF needs the tokenizer")
    if not hasattr(run.tokenizer, "vocab") or not hasattr(run.tokenizer, "pattern"):
        raise UserError(f"{run_dir}: GGUF export needs a byte-level BPE tokenizer")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        _add_metadata(writer, cfg, dtype, Path(run_dir).name)
        tok = tokenizer_fields(run.tokenizer, cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        if tok["eot_id"] is not None:
            writer.add_bos_token_id(tok["eot_id"])
            writer.add_eos_token_id(tok["eot_id"])
        writer.add_add_bos_token(False)
        for name, tensor in _progress(gguf_tensors(model, cfg.n_head, cfg.n_kv_head), progress):
            data, raw = encode_tensor(tensor, dtype)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def encode_tensor(tensor: torch.Tensor, dtype: str):
    """(numpy data, GGML type or None) for one tensor: 1-D tensors stay F32, as llama.cpp expects."""
    from gguf import GGMLQuantizationType as Q

    w = tensor.numpy().astype(np.float32)
    if w.ndim == 1 or dtype == "f32":
        return w, None
    if dtype == "f16" or w.shape[1] % QK:
        return w.astype(np.float16), None
    if dtype == "q8_0":
        return q8_0_encode(w), Q.Q8_0
    return q4_0_encode(w), Q.Q4_0


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama_ftype values


def _add_metadata(writer, cfg, dtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPES[dtype])


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="gguf", unit="tensor", leave=False)
