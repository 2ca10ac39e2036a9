"""LoRA: identity at init, merged equals unmerged, only adapters train, adapters save/load."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.model.config import ModelConfig, preset_fields
from scratchlm.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_adapters,
    trainable_parameters,
    unmerge_lora,
)
from scratchlm.model.transformer import Transformer


def tiny_model(preset: str = "llama-tiny", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    fields = preset_fields(preset)
    fields.update(vocab_size=97, dropout=0.0)
    return Transformer(ModelConfig(**fields)).eval()


def tokens(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_lora_at_init_leaves_outputs_unchanged(preset):
    model = tiny_model(preset)
    x = tokens()
    before = model(x)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert wrapped and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_merged_equals_unmerged_and_unmerge_restores():
    model = tiny_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    perturb_adapters(model)
    x = tokens()
    unmerged = model(x)
    assert not torch.allclose(unmerged, tiny_model()(x), atol=1e-4), "adapters should change outputs"
    merge_lora(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    for key, value in original.items():  # base weights back where they were
        plain = model.state_dict().get(key.replace("_proj.weight", "_proj.base.weight"), None)
        if plain is not None:
            torch.testing.assert_close(plain, value, rtol=0, atol=1e-6)


def test_merged_state_dict_loads_into_a_plain_model():
    model = tiny_model()
    plain_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_adapters(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    merged = merged_state_dict(model)
    assert set(merged) == plain_keys
    fresh = tiny_model(seed=123)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_train():
    model = tiny_model()
    full = trainable_parameters(model)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert trainable_parameters(model) < full / 5
    model.train()
    loss = model(tokens()).logsumexp(-1).mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_rank_zero_is_full_finetuning():
    model = tiny_model()
    assert apply_lora(model, LoRAConfig(rank=0)) == []
    assert all(p.requires_grad for p in model.parameters())


def test_adapters_disabled_gives_the_base_model():
    model = tiny_model()
    x = tokens()
    base = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    perturb_adapters(model)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert not torch.allclose(model(x), base, atol=1e-4)


def test_save_and_load_adapters_alone(tmp_path):
    model = tiny_model()
    config = LoRAConfig(rank=3, alpha=6, target_modules=["q_proj", "o_proj"])
    apply_lora(model, config)
    perturb_adapters(model)
    save_adapters(tmp_path, model, config)
    other = tiny_model()
    loaded = load_adapters(tmp_path, other)
    assert loaded == config
    x = tokens()
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    state = lora_state_dict(other)
    assert set(state) == set(lora_state_dict(model))


def test_bad_target_is_a_user_error():
    with pytest.raises(UserError, match="matched no module"):
        apply_lora(tiny_model(), LoRAConfig(rank=2, target_modules=["qproj"]))


def test_qlora_on_a_quantized_base():
    quant = pytest.importorskip("scratchlm.model.quant")
    model = tiny_model()
    quant.quantize_model(model, bits=4, group_size=32, embed_bits=None, head_bits=None, progress=False)
    x = tokens()
    before = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(UserError, match="quantized"):
        merge_lora(model)
