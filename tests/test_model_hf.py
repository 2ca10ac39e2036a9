"""Numerics against Hugging Face transformers (the oracle), and config resolution.

Export code relies on our logits equalling GPT2LMHeadModel's and LlamaForCausalLM's for the
same weights, so the mapping here is written out in the test itself (independent of
scratchlm.interop) and the comparison is exact to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.model import ModelConfig, Transformer, model_config
from scratchlm.model.config import PRESETS, config_from_mapping

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomised(config: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # biases and norm weights too, so none hides behind 0 or 1
    return model


def gpt2_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our names -> GPT2LMHeadModel's (fused qkv, Conv1D weights stored transposed)."""
    sd = {
        "transformer.wte.weight": model.tok_embeddings.weight,
        "transformer.wpe.weight": model.pos_embeddings.weight,
        "transformer.ln_f.weight": model.norm.weight,
        "transformer.ln_f.bias": model.norm.bias,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.layers):
        p, attn, mlp = f"transformer.h.{i}.", layer.attn, layer.mlp
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = layer.attn_norm.weight, layer.attn_norm.bias
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = layer.mlp_norm.weight, layer.mlp_norm.bias
        sd[p + "attn.c_attn.weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T
        sd[p + "attn.c_attn.bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = attn.o_proj.weight.T, attn.o_proj.bias
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = mlp.up_proj.weight.T, mlp.up_proj.bias
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = mlp.down_proj.weight.T, mlp.down_proj.bias
    return {k: v.detach().contiguous() for k, v in sd.items()}


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our names -> LlamaForCausalLM's / Qwen3ForCausalLM's (same layout, renamed)."""
    renames = (("tok_embeddings", "model.embed_tokens"), ("layers.", "model.layers."),
               ("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
               (".attn.", ".self_attn."))
    sd = {}
    for name, tensor in model.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        sd["model.norm.weight" if name == "norm.weight" else name] = tensor
    return sd


def test_gpt2_logits_equal_gpt2lmheadmodel():
    cfg = model_config("gpt2-tiny")
    ours = randomised(cfg)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )).eval()
    hf.load_state_dict(gpt2_state_dict(ours), strict=False)  # HF also holds non-persistent mask buffers
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_head=1, norm_eps=1e-6, rope_theta=5e5)])
def test_llama_logits_equal_llamaforcausallm(overrides):
    cfg = model_config("llama-tiny", **overrides)
    ours = randomised(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )).eval()
    hf.load_state_dict(llama_state_dict(ours), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
        # a left-padded batch: HF's attention_mask + position_ids against our attn_mask + positions
        keep = torch.ones(2, 40, dtype=torch.long)
        keep[0, :6] = 0
        positions = (keep.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(idx, attention_mask=keep, position_ids=positions).logits
        mine = ours(idx, positions=positions, attn_mask=keep.bool()[:, None, None, :])
        torch.testing.assert_close(mine[0, 6:], theirs[0, 6:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine[1], theirs[1], atol=1e-5, rtol=1e-5)


def test_qk_norm_equals_qwen3():
    """Our per-head RMSNorm on queries and keys (before RoPE) is Qwen3's."""
    cfg = model_config("llama-tiny", qk_norm=True, norm_eps=1e-6)
    ours = randomised(cfg)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
    )).eval()
    hf.load_state_dict(llama_state_dict(ours), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_resolves_and_round_trips(preset):
    cfg = model_config(preset)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert config_from_mapping(cfg.to_dict()) == cfg


def test_family_names_and_overrides():
    assert model_config("gpt2") == model_config("gpt2-124m")
    small = model_config("gpt2", n_layer=2, d_model=64, n_head=4)
    assert (small.n_layer, small.d_model, small.d_ff) == (2, 64, 256)  # d_ff follows d_model
    llama = model_config("llama-1b", d_model=256, n_head=8)
    assert llama.n_kv_head == 2 and llama.d_ff == 704  # GQA ratio kept; SwiGLU 8/3 width, rounded
    assert model_config("llama-tiny", d_ff=100).d_ff == 100
    assert config_from_mapping({"preset": "llama-tiny", "n_layer": 3}).n_layer == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: model_config("gpt3"), "unknown model preset 'gpt3'"),
        (lambda: model_config("gpt2-tiny", n_layr=3), "model.n_layr.*did you mean model.n_layer"),
        (lambda: model_config("gpt2-tiny", n_head=5), "model.d_model .* divisible by model.n_head"),
        (lambda: model_config("llama-tiny", n_kv_head=3), "divisible by model.n_kv_head"),
        (lambda: model_config("gpt2-tiny", norm="batchnorm"), "model.norm must be one of"),
        (lambda: model_config("gpt2-tiny", n_layer=0), "model.n_layer must be a positive integer"),
        (lambda: ModelConfig.from_dict({"vocab_size": 10, "colour": 1}), "unknown model config key model.colour"),
        (lambda: model_config("gpt2-tiny", dropout="x"), "model.dropout must be a number"),
        (lambda: model_config("gpt2-tiny", bias="yes"), "model.bias must be true or false"),
        (lambda: config_from_mapping({"preset": "gpt2-tiny", "n_head": 5}, "r.toml"), "^r.toml: "),
    ],
)
def test_bad_configs_raise_one_line_user_errors(make, message):
    with pytest.raises(UserError, match=message) as e:
        make()
    assert "\n" not in str(e.value)
