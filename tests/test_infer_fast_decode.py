"""The fast decode steps (scratchlm.infer.fast_decode), both the C kernels' `NativeDecodeStep`
and the torch `FusedDecodeStep`: their logits equal the model's own one-token forward for every
pre-norm preset and switch, their greedy output equals the unfused path (batched and padded
too), they refuse models they cannot mirror, follow weight changes, and leave the model's
parameters and state dict untouched."""

from __future__ import annotations

import pytest
import torch

from scratchlm.infer import native as native_lib
from scratchlm.infer.fast_decode import (
    FusedDecodeStep,
    NativeDecodeStep,
    fused_step_for,
    supports,
    supports_native,
)
from scratchlm.infer.generate import BatchDecoder, generate_ids, new_kv_cache
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4], [11, 12, 13, 14, 15]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(preset: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = model_config(f"{preset}-tiny", vocab_size=64, max_seq_len=64, init_std=0.3, dropout=0.0,
                          **overrides)
    return Transformer(config).eval()


VARIANTS = [
    ("llama", {}),
    ("gpt2", {}),  # learned positions, LayerNorm, GELU, biases, tied head
    ("llama", {"qk_norm": True, "bias": True}),
    ("llama", {"n_kv_head": 1}),  # MQA
    ("gpt2", {"activation": "relu2"}),
]


@pytest.fixture
def torch_kernels(monkeypatch):
    """Decode as if the C kernels could not be built (the torch fused step takes over)."""
    monkeypatch.setattr(native_lib, "_LIBRARY", [None])


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("preset,overrides", VARIANTS)
def test_fused_step_logits_equal_model_forward(preset, overrides, native):
    model = make_model(preset, seed=3, **overrides)
    step = fused_step_for(model, native=native)
    expected = NativeDecodeStep if native and supports_native(model) else FusedDecodeStep
    assert type(step) is expected
    if native and native_lib.library() is not None:
        assert (expected is NativeDecodeStep) == (not overrides.get("qk_norm"))
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.inference_mode():
        ours, theirs = new_kv_cache(model, 2, 16), new_kv_cache(model, 2, 16)
        model(ids, kv_cache=ours)
        model(ids, kv_cache=theirs)
        for token in ([7, 8], [2, 0], [63, 1]):
            nxt = torch.tensor(token).unsqueeze(1)
            fused = step(nxt, ours)
            plain = model(nxt, kv_cache=theirs)[:, -1]
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
            assert ours.length == theirs.length
        for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_fused_greedy_equals_unfused_batched_and_padded(preset, native, monkeypatch):
    monkeypatch.setattr(FusedDecodeStep, "max_rows", len(PROMPTS))  # the whole padded batch goes fused
    if not native:
        monkeypatch.setattr(native_lib, "_LIBRARY", [None])
    model = make_model(preset, seed=4)
    assert type(fused_step_for(model)) is (NativeDecodeStep if native_lib.library() else FusedDecodeStep)
    fused = generate_ids(model, PROMPTS, max_new_tokens=24)
    plain = generate_ids(model, PROMPTS, max_new_tokens=24, fused=False)
    alone = [generate_ids(model, [p], max_new_tokens=24, use_cache=False)[0] for p in PROMPTS]
    assert fused == plain == alone


def test_unsupported_models_decode_through_the_model():
    from scratchlm.model.lora import LoRAConfig, apply_lora
    from scratchlm.model.quant import quantize_model

    assert not supports(make_model("vaswani"))  # post-norm blocks
    training = make_model("llama").train()
    assert fused_step_for(training) is None
    lora = make_model("llama")
    apply_lora(lora, LoRAConfig(rank=2))
    assert fused_step_for(lora.eval()) is None
    quant = make_model("llama", seed=6)
    quantize_model(quant, bits=8, progress=False)
    assert fused_step_for(quant) is None
    # and they still generate, equal to recomputing everything
    assert generate_ids(lora, PROMPTS[:1], max_new_tokens=6) == generate_ids(
        lora, PROMPTS[:1], max_new_tokens=6, use_cache=False)


def test_step_follows_weight_updates_and_leaves_the_model_alone():
    model = make_model("llama", seed=5)
    keys_before = set(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    first = fused_step_for(model)
    assert fused_step_for(model) is first  # built once, reused
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(-2.0)  # in place, as an optimizer step would
    second = fused_step_for(model)
    assert second is not first
    assert generate_ids(model, PROMPTS[:1], max_new_tokens=12) == generate_ids(
        model, PROMPTS[:1], max_new_tokens=12, use_cache=False)
    assert set(model.state_dict()) == keys_before
    assert [id(p) for p in model.parameters()] == params_before


def test_batch_shrinking_to_one_padded_row_switches_to_the_fused_step():
    """Rows that stop early leave one row with pad columns: it decodes through the fused step
    (positions and mask as the model would use) and still equals generating it alone."""
    model = make_model("llama", seed=7)
    alone = [generate_ids(model, [p], max_new_tokens=20, use_cache=False)[0] for p in PROMPTS]
    stop = alone[0][3]  # ends the first row early; the others may stop on it too
    expected = [generate_ids(model, [p], max_new_tokens=20, stop_ids=[stop], use_cache=False)[0]
                for p in PROMPTS]
    decoder = BatchDecoder(model, PROMPTS, max_new_tokens=20, stop_ids=[stop])
    while not decoder.done:
        decoder.step()
    assert [r.tokens for r in decoder.rows] == expected
    lengths = sorted(len(t) for t in expected)
    assert lengths[-1] > lengths[-2] + 1, "the setup must leave one row decoding alone"
    assert decoder.fused_step is not None
