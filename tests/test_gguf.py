"""GGUF export (scratchlm.interop.gguf): block encoders, RoPE layout, and the file read back.

Oracles: the `gguf` package's own Q8_0/Q4_0 quantizer (our bytes must be identical) and reader,
and transformers' GGUF loader, which must compute our logits from the file (1e-3 in F16) and
tokenize text exactly as our tokenizer does.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from scratchlm.errors import UserError  # noqa: E402
from scratchlm.interop.gguf import (  # noqa: E402
    export_gguf,
    permute_for_interleaved_rope,
    q4_0_encode,
    q8_0_encode,
)
from scratchlm.model.config import model_config  # noqa: E402
from scratchlm.model.layers import apply_rope, rope_cos_sin  # noqa: E402
from scratchlm.model.transformer import Transformer  # noqa: E402
from scratchlm.runs import load_run, save_run  # noqa: E402
from scratchlm.tokenizer.bpe import BPETokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!\n" * 3,
    "def add(x, y):\n    return x + y  # numbers 123 4567\n",
] * 4
SAMPLE = "Hello there, quick fox!\n  def f(y):  return 42 + 1234"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    tok = BPETokenizer.train(TEXTS, vocab_size=320, progress=False)
    torch.manual_seed(0)
    model = Transformer(model_config("llama-tiny", vocab_size=330, max_seq_len=64))
    with torch.no_grad():  # larger weights than the init, so layout mistakes show in the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    run_dir = tmp_path_factory.mktemp("gguf") / "run"
    save_run(run_dir, model, tok, {"model": model.config.to_dict()})
    return run_dir


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_block_encoders_match_the_reference_bytes(fmt):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 96)) * rng.uniform(0.01, 10, (8, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block must not divide by zero
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    mine = (q8_0_encode if fmt == "Q8_0" else q4_0_encode)(w)
    assert np.array_equal(mine, gguf.quants.quantize(w, qtype))
    back = gguf.quants.dequantize(mine, qtype)
    step = np.abs(w.reshape(-1, 32)).max(1, keepdims=True) / (127 if fmt == "Q8_0" else 8)
    # half a step, plus the fp16 rounding of the scale times the largest code; Q4_0's codes
    # reach -8 but only +7, so the value opposite the largest one can be off by a whole step
    bound = step * (0.5 + 127 * 2**-11) if fmt == "Q8_0" else step * (1 + 8 * 2**-11)
    assert np.all(np.abs(back - w).reshape(-1, 32) <= bound + 1e-7)


def rope_interleaved(x, positions, theta):
    """llama.cpp's RoPE: adjacent pairs (2i, 2i+1) rotated by frequency i."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = positions.float()[:, None] * inv  # [T, d/2]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1)
    return out.flatten(-2)


def test_permuted_projection_under_interleaved_rope_equals_ours():
    torch.manual_seed(0)
    n_head, head_dim, d_model, T = 3, 8, 12, 5
    w = torch.randn(n_head * head_dim, d_model)
    x = torch.randn(T, d_model)
    positions = torch.arange(T) + 3
    cos, sin = rope_cos_sin(positions[None], head_dim, 10000.0)
    ours = apply_rope((x @ w.T).view(T, n_head, head_dim).transpose(0, 1)[None], cos, sin)[0]
    theirs = rope_interleaved((x @ permute_for_interleaved_rope(w, n_head).T).view(T, n_head, head_dim).transpose(0, 1), positions, 10000.0)
    # same attention scores need the same vectors up to the fixed per-head permutation
    perm = permute_for_interleaved_rope(torch.arange(head_dim).float()[:, None], 1)[:, 0].long()
    torch.testing.assert_close(theirs, ours[..., perm], atol=1e-5, rtol=1e-5)


def test_file_reads_back_with_metadata_tokenizer_and_types(llama_run, tmp_path):
    run = load_run(llama_run)
    for dtype, expected in [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")]:
        path = export_gguf(llama_run, tmp_path / f"m-{dtype}.gguf", dtype, progress=False)
        reader = gguf.GGUFReader(path)
        fields = reader.fields
        assert fields["general.architecture"].contents() == "llama"
        assert fields["llama.block_count"].contents() == 2
        assert fields["llama.attention.head_count_kv"].contents() == run.model.config.n_kv_head
        assert fields["tokenizer.ggml.model"].contents() == "gpt2"
        tokens = fields["tokenizer.ggml.tokens"].contents()
        assert len(tokens) == 330 and tokens[run.tokenizer.eot_id] == "<|endoftext|>"
        assert len(fields["tokenizer.ggml.merges"].contents()) >= 320 - 257
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == 2 + 2 * 9 + 1  # embeddings, 9 per block, output norm + head
        assert tensors["blk.0.ffn_gate.weight"].tensor_type.name == expected
        assert tensors["output_norm.weight"].tensor_type.name == "F32"
        assert list(tensors["token_embd.weight"].shape) == [64, 330]
    sizes = {d: (tmp_path / f"m-{d}.gguf").stat().st_size for d in ("f16", "q8_0", "q4_0")}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers' GGUF loader needs accelerate")
def test_transformers_gguf_loader_computes_our_logits(llama_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = load_run(llama_run)
    idx = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = run.model(idx)
        for p in run.model.parameters():  # the same model with its matrices rounded as F16 stores them
            if p.ndim == 2:
                p.copy_(p.half().float())
        ours_f16 = run.model(idx)
    for dtype, reference, tol in [("f32", ours, 1e-5), ("f16", ours_f16, 1e-3), ("q8_0", ours, None)]:
        export_gguf(llama_run, tmp_path / f"m-{dtype}.gguf", dtype, progress=False)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{dtype}.gguf", dtype=torch.float32)
        with torch.no_grad():
            theirs = hf(idx).logits
        err = (theirs - reference).abs().max().item()
        if tol is None:  # 8-bit weights: close, not equal
            assert err < 0.05 * ours.abs().max().item(), err
        else:
            assert err < tol, (dtype, err)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m-f16.gguf")
    assert hf_tok.encode(SAMPLE, add_special_tokens=False) == run.tokenizer.encode(SAMPLE)


def test_non_llama_models_and_bad_dtypes_are_refused(tmp_path):
    tok = BPETokenizer.train(TEXTS, vocab_size=300, progress=False)
    model = Transformer(model_config("gpt2-tiny", vocab_size=300, max_seq_len=32))
    save_run(tmp_path / "gpt2", model, tok, {"model": model.config.to_dict()})
    with pytest.raises(UserError, match="llama architecture"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf", progress=False)
    with pytest.raises(UserError, match="q4_0"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf", dtype="q5_k", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
