"""Quantization math and module swapping (scratchlm.model.quant) on small fake models.

Error bounds are the rounding guarantees (|w - dequant(w)| <= scale / 2), checked as properties
over random shapes and magnitudes; GPTQ is held to doing better than round-to-nearest on the
layer outputs it was calibrated for; saved quantized states must reload bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from scratchlm.errors import UserError
from scratchlm.model import quant
from scratchlm.model.quant import (
    QuantEmbedding,
    QuantLinear,
    TiedQuantHead,
    apply_quantization,
    dequantize,
    gptq_quantize_weight,
    pack_int4,
    quantize_model,
    quantize_weight,
    unpack_int4,
)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class Mlp(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.up_proj = nn.Linear(d, 4 * d, bias=bias)
        self.down_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = Attn(d), Mlp(d, bias)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class FakeLM(nn.Module):
    """The module names of scratchlm's Transformer, without attention across positions."""

    def __init__(self, vocab=96, d=64, n_layer=2, tied=True, bias=True):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, bias) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok_embeddings.weight

    def forward(self, idx):
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def fake_model(seed=0, **kw) -> FakeLM:
    torch.manual_seed(seed)
    return FakeLM(**kw).eval()


matrices = st.tuples(
    st.integers(1, 6),  # rows
    st.sampled_from([32, 64, 128]),  # cols
    st.floats(1e-3, 1e3),  # magnitude
    st.integers(0, 2**31 - 1),  # seed
)


@settings(max_examples=40, deadline=None)
@given(matrices, st.sampled_from([(8, None), (4, 32), (4, None)]))
def test_dequantize_error_is_at_most_half_a_step(shape, fmt):
    rows, cols, magnitude, seed = shape
    bits, group = fmt
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * magnitude
    qw = quantize_weight(w, bits, group)
    err = (qw.dequantize() - w).abs()
    group_cols = cols if group is None else group
    step = qw.scale.float().repeat_interleave(group_cols, dim=1)
    # half a quantization step, plus the fp16 rounding of the INT4 offset
    slack = 1e-6 * magnitude + (w.abs() * 2**-10 if bits == 4 else 0)
    assert torch.all(err <= step / 2 + slack)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_int4_pack_round_trip(rows, half_cols, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, 2 * half_cols), generator=gen, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(unpack_int4(packed), codes)
    # the layout: even column in the low nibble
    assert torch.equal(packed & 0xF, codes[:, 0::2])


def test_codes_use_the_full_range_and_storage_dtypes():
    w = torch.randn(8, 64)
    q8 = quantize_weight(w, 8)
    assert q8.qweight.dtype == torch.int8 and q8.qweight.abs().max() == 127
    q4 = quantize_weight(w, 4, 32)
    codes = unpack_int4(q4.qweight)
    assert q4.scale.dtype == torch.float16 and q4.scale.shape == (8, 2)
    assert codes.min() == 0 and codes.max() == 15
    assert q4.qweight.numel() * 2 == w.numel()


def test_group_size_falls_back_to_a_divisor_of_the_input_size():
    from scratchlm.model.quant import group_for

    assert group_for(352, 4, 64, "down_proj") == 32  # SwiGLU hidden size 352 = 11 * 32
    assert group_for(256, 4, 64, "q_proj") == 64 and group_for(256, 8, 64, "q_proj") is None
    with pytest.raises(UserError, match="even"):
        group_for(256, 4, 7, "q_proj")


def test_bad_group_size_is_a_user_error():
    with pytest.raises(UserError, match="group size"):
        quantize_weight(torch.randn(4, 96), 4, 64)
    with pytest.raises(UserError, match="INT4"):
        quantize_weight(torch.randn(4, 64), 8, 32)
    with pytest.raises(UserError, match="bits"):
        quantize_weight(torch.randn(4, 64), 3)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quant_linear_computes_with_the_dequantized_weight(bits, group):
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    qw = quantize_weight(lin.weight.data, bits, group)
    qlin = QuantLinear.from_linear(lin, qw, group)
    x = torch.randn(3, 5, 64)
    expected = nn.functional.linear(x, qw.dequantize(), lin.bias)
    torch.testing.assert_close(qlin(x), expected)
    rel = (qlin(x) - lin(x)).norm() / lin(x).norm()
    assert rel < (0.01 if bits == 8 else 0.15)
    assert qlin(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_quant_embedding_looks_up_dequantized_rows():
    emb = nn.Embedding(50, 64)
    qw = quantize_weight(emb.weight.data, 4, 32)
    qemb = QuantEmbedding(50, 64, 4, 32)
    qemb.set_quantized(qw)
    idx = torch.tensor([[3, 49, 0], [7, 7, 1]])
    torch.testing.assert_close(qemb(idx), qw.dequantize()[idx])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_model_swaps_every_projection_and_keeps_ties(bits):
    model = fake_model()
    idx = torch.randint(0, 96, (2, 12))
    ref = model(idx)
    section = quantize_model(model, bits=bits, group_size=32, progress=False)
    assert not any(type(m) is nn.Linear or type(m) is nn.Embedding for m in model.modules())
    assert isinstance(model.lm_head, TiedQuantHead) and isinstance(model.tok_embeddings, QuantEmbedding)
    assert section["modules"]["lm_head"] == {"tied_to": "tok_embeddings"}
    assert section["modules"]["layers.1.mlp.down_proj"] == {"bits": bits, "group_size": None if bits == 8 else 32}
    out = model(idx)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if bits == 8 else 0.3)
    # the codes are stored once: no lm_head tensors in the state dict
    assert not any(k.startswith("lm_head") for k in model.state_dict())


def test_embeddings_and_head_are_quantized_separately():
    model = fake_model(tied=False)
    section = quantize_model(model, bits=4, group_size=32, embed_bits=None, head_bits=8, progress=False)
    assert type(model.tok_embeddings) is nn.Embedding
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    assert section["modules"]["lm_head"]["bits"] == 8 and "tok_embeddings" not in section["modules"]


@pytest.mark.parametrize("tied,method", [(True, "rtn"), (False, "gptq"), (False, "awq")])
def test_saved_quantized_state_reloads_exactly(tied, method):
    model = fake_model(tied=tied)
    calib = torch.randint(0, 96, (8, 16))
    section = quantize_model(model, bits=4, group_size=32, method=method, calibration=calib, progress=False)
    blob = save(model.state_dict())
    fresh = fake_model(seed=123, tied=tied)
    apply_quantization(fresh, section)
    fresh.load_state_dict(load(blob), strict=True)
    idx = torch.randint(0, 96, (2, 9))
    assert torch.equal(fresh(idx), model(idx))


def test_quantized_state_is_much_smaller():
    model = fake_model(vocab=256, d=128)
    fp32 = len(save({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}))
    sizes = {}
    for bits in (8, 4):
        m = fake_model(vocab=256, d=128)
        quantize_model(m, bits=bits, group_size=64, progress=False)
        sizes[bits] = len(save(m.state_dict()))
    assert fp32 / sizes[8] > 3.5
    assert fp32 / sizes[4] > 6.0


def test_gptq_beats_rtn_on_its_calibration_outputs():
    torch.manual_seed(0)
    # correlated inputs (as real activations are) are where GPTQ's error feedback pays off
    mix = torch.randn(64, 64) * torch.linspace(0.05, 2.0, 64)
    x = torch.randn(2048, 64) @ mix
    w = torch.randn(32, 64)
    hessian = x.T @ x
    for bits, group in [(8, None), (4, 32)]:
        rtn = quantize_weight(w, bits, group).dequantize()
        gptq = gptq_quantize_weight(w, hessian, bits, group).dequantize()
        err_rtn = ((x @ (rtn - w).T) ** 2).mean()
        err_gptq = ((x @ (gptq - w).T) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (bits, err_gptq, err_rtn)


def test_gptq_model_is_closer_to_the_float_model_than_rtn():
    calib = torch.randint(0, 96, (16, 24))
    ref_model = fake_model(tied=False, n_layer=1)
    ref = ref_model(calib)
    errs = {}
    for method in ("rtn", "gptq"):
        m = fake_model(tied=False, n_layer=1)
        quantize_model(m, bits=4, group_size=32, method=method, calibration=calib, embed_bits=None, progress=False)
        errs[method] = ((m(calib) - ref) ** 2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_gptq_without_calibration_or_bad_section_is_a_user_error():
    with pytest.raises(UserError, match="calibration"):
        quantize_model(fake_model(), bits=4, method="gptq", progress=False)
    with pytest.raises(UserError, match="format"):
        apply_quantization(fake_model(), {"format": "other"})
    with pytest.raises(UserError, match="does not have"):
        apply_quantization(fake_model(), {"format": quant.FORMAT, "modules": {"nope": {"bits": 8}}})


@settings(max_examples=30, deadline=None)
@given(matrices, st.sampled_from([8, 4]), st.booleans())
def test_clip_search_never_rounds_worse_than_the_full_range(shape, bits, weighted):
    rows, cols, magnitude, seed = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    w[:, 0] *= 8  # an outlier column: where clipping pays off
    importance = torch.rand(1, cols, generator=g) if weighted else torch.ones(1, cols)

    def weighted_error(scale, offset):
        deq = quant.dequantize_codes(quant.quantize_codes(w, scale, offset, bits), scale, offset)
        return (importance * (deq - w) ** 2).sum(dim=1)

    plain = weighted_error(*quant.group_params(w, bits))
    searched = weighted_error(*quant.search_group_params(w, bits, importance))
    assert torch.all(searched <= plain * (1 + 1e-5) + 1e-12)


def correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.05, 2.0, d)
    return torch.randn(n, d, generator=g) @ mix


def test_gptq_clip_search_lowers_the_layer_output_error():
    x = correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    w[:, ::16] *= 6  # outliers make the full [min, max] range wasteful
    errs = {}
    for search in (False, True):
        deq = gptq_quantize_weight(w, x.T @ x, 4, 64, clip_search=search).dequantize()
        errs[search] = ((x @ (deq - w).T) ** 2).mean().item()
    rtn = ((x @ (quantize_weight(w, 4, 64).dequantize() - w).T) ** 2).mean().item()
    assert errs[True] < errs[False] < rtn


def test_gptq_on_a_tied_head_keeps_one_matrix_and_beats_rtn_on_the_logits():
    calib = torch.randint(0, 96, (16, 24))
    ref = fake_model(tied=True, n_layer=1)
    with torch.no_grad():
        hidden = ref.norm(ref.layers[0](ref.tok_embeddings(calib)))
        ref_logits = ref.lm_head(hidden)
    head_err = {}
    for method in ("rtn", "gptq"):
        m = fake_model(tied=True, n_layer=1)
        section = quantize_model(m, bits=4, group_size=64, method=method, calibration=calib, progress=False)
        assert isinstance(m.lm_head, TiedQuantHead) and section["modules"]["lm_head"] == {"tied_to": "tok_embeddings"}
        # the lookup and the head read the same codes
        assert torch.equal(m.lm_head.weight, m.tok_embeddings.weight)
        assert torch.equal(m.tok_embeddings(calib[:1]), m.lm_head.weight[calib[:1]])
        with torch.no_grad():
            head_err[method] = ((m.lm_head(hidden) - ref_logits) ** 2).mean().item()
    assert head_err["gptq"] < head_err["rtn"]


def kl_to(reference, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(reference(ids), -1)
        q = torch.log_softmax(model(ids), -1)
    return torch.nn.functional.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("bits,method,at_most", [(4, "rtn", 0.8), (8, "gptq", 0.9)])  # INT8 starts very close
def test_tuning_the_scales_brings_the_model_closer_to_the_float_model(bits, method, at_most):
    torch.manual_seed(0)
    calib = torch.randint(0, 96, (16, 24))
    reference = fake_model(tied=False, n_layer=1)
    untuned = fake_model(tied=False, n_layer=1)
    quantize_model(untuned, bits=bits, group_size=32, method=method, calibration=calib, progress=False)
    tuned = fake_model(tied=False, n_layer=1)
    section = quantize_model(tuned, bits=bits, group_size=32, method=method, calibration=calib, progress=False,
                             tune_steps=30, tune_lr=2e-2)
    assert section["tune_steps"] == 30
    assert kl_to(reference, tuned, calib) < at_most * kl_to(reference, untuned, calib)
    for name, store in tuned.named_modules():
        if isinstance(store, quant._QuantStore):
            other = untuned.get_submodule(name)
            assert torch.equal(store.qweight, other.qweight)  # only scales and offsets move
            assert store.scale.dtype == other.scale.dtype and not store.scale.requires_grad
    assert all(p.requires_grad for p in tuned.parameters())  # left as it was found
    # the tuned state saves and reloads bit for bit
    fresh = fake_model(seed=5, tied=False, n_layer=1)
    apply_quantization(fresh, section)
    fresh.load_state_dict(load(save(tuned.state_dict())), strict=True)
    assert torch.equal(fresh(calib[:2]), tuned(calib[:2]))


def test_tuning_without_calibration_is_a_user_error():
    with pytest.raises(UserError, match="calibration"):
        quantize_model(fake_model(), bits=4, tune_steps=5, progress=False)
    with pytest.raises(UserError, match="tune-steps"):
        quantize_model(fake_model(), bits=4, tune_steps=-1, calibration=torch.zeros(1, 4, dtype=torch.long), progress=False)


def outlier_channel_inputs(n=1024, d=64, seed=0):
    """Activations with a few channels far larger than the rest, as trained models have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 20
    return x


def test_awq_scale_search_beats_round_to_nearest_on_outlier_channels():
    x = outlier_channel_inputs()
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    specs = [(4, 64), (4, 64)]
    scale, alpha = quant.awq_search_scale(x, weights, specs)
    assert scale.shape == (64,) and alpha > 0
    assert scale[:4].min() > scale[4:].max()  # the loud channels get the finer steps

    def output_error(s):
        return sum(((x @ (quantize_weight(w * s, 4, 64, clip_search=True).dequantize() / s - w).T) ** 2).sum()
                   for w in weights)

    assert output_error(scale) < 0.8 * output_error(torch.ones(64))


def test_awq_folding_keeps_the_float_model_exact():
    model = fake_model(tied=False, n_layer=2)
    idx = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(idx)
        plan = {name: (4, 32) for name in quant._block_linears(model)} | {"lm_head": (4, 32)}
        groups = quant._awq_groups(model, plan)
        # fake model: no SwiGLU and no attention of v alone, so only norm -> projection folds
        assert [(p, how) for p, how, _ in groups] == [
            ("layers.0.attn_norm", "norm"), ("layers.0.mlp_norm", "norm"),
            ("layers.1.attn_norm", "norm"), ("layers.1.mlp_norm", "norm"), ("norm", "norm")]
        for producer, how, consumers in groups:
            quant._fold_scale(model, producer, how, consumers, torch.rand(64) * 3 + 0.1)
        assert torch.allclose(model(idx), before, atol=1e-4, rtol=1e-4)


def test_awq_folds_into_the_up_projection_of_a_swiglu_mlp(tmp_path):
    from scratchlm.model.config import ModelConfig
    from scratchlm.model.transformer import Transformer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=16,
                         activation="swiglu", norm="rmsnorm", tie_embeddings=False)
    model = Transformer(config).eval()
    plan = {name: (4, 32) for name in quant._block_linears(model)} | {"lm_head": (4, 32)}
    producers = {p: how for p, how, _ in quant._awq_groups(model, plan)}
    assert producers == {"layers.0.attn_norm": "norm", "layers.0.attn.v_proj": "rows", "layers.0.mlp_norm": "norm",
                         "layers.0.mlp.up_proj": "rows", "norm": "norm"}
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(idx)
        for producer, how, consumers in quant._awq_groups(model, plan):
            quant._fold_scale(model, producer, how, consumers, torch.rand(model.get_submodule(consumers[0]).in_features) + 0.5)
        assert torch.allclose(model(idx), before, atol=1e-4, rtol=1e-4)


def test_awq_model_is_closer_to_the_float_model_than_rtn():
    calib = torch.randint(0, 96, (16, 24))
    errs = {}
    for method in ("rtn", "awq"):
        m = fake_model(tied=False, n_layer=1)
        with torch.no_grad():  # loud channels after the norms, as in trained models
            for norm in (m.layers[0].attn_norm, m.layers[0].mlp_norm, m.norm):
                norm.weight[:4] = 12.0
        ref = m(calib).detach()
        quantize_model(m, bits=4, group_size=64, method=method, calibration=calib, embed_bits=None, progress=False)
        errs[method] = ((m(calib) - ref) ** 2).mean().item()
    # end to end the gain is modest (the scale search test above isolates it); it must not be a loss
    assert errs["awq"] < errs["rtn"]
