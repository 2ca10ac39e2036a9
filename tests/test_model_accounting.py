"""Sizing arithmetic against the model itself: parameters, FLOPs, activation memory, `model info`.

The oracles are the built model (its parameters and Linear layers), torch's FlopCounterMode,
and the tensors autograd actually saves for backward.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from scratchlm.errors import UserError
from scratchlm.model import Transformer, accounting, model_config
from scratchlm.model import cli as model_cli


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


configs = st.builds(
    lambda family, n_layer, n_head, group, head_dim, **kw: model_config(
        f"{family}-tiny", n_layer=n_layer, n_head=n_head, n_kv_head=n_head // group, d_model=n_head * head_dim, **kw
    ),
    family=st.sampled_from(["gpt2", "llama", "vaswani"]),
    n_layer=st.integers(1, 3),
    n_head=st.sampled_from([2, 4]),
    group=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8]),
    vocab_size=st.integers(5, 300),
    activation=st.sampled_from(["relu", "gelu", "swiglu", "relu2"]),
    norm=st.sampled_from(["layernorm", "rmsnorm"]),
    norm_position=st.sampled_from(["pre", "post"]),
    positions=st.sampled_from(["learned", "rope", "sinusoidal", "none"]),
    bias=st.booleans(),
    tie_embeddings=st.booleans(),
    qk_norm=st.booleans(),
)


@settings(max_examples=40, deadline=None)
@given(configs)
def test_parameter_count_equals_sum_of_numel(cfg):
    model = Transformer(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    assert accounting.num_parameters(cfg) == sum(unique.values()) == model.num_parameters()
    lookups = model.tok_embeddings.weight.numel()
    lookups += model.pos_embeddings.weight.numel() if cfg.positions == "learned" else 0
    lookups += 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    assert accounting.num_parameters(cfg, non_embedding=True) == sum(unique.values()) - lookups
    assert model.num_parameters(non_embedding=True) == sum(unique.values()) - lookups
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert accounting.matmul_params(cfg) == linear_weights


def test_known_sizes():
    assert accounting.num_parameters(model_config("gpt2-124m")) == 124_439_808  # GPT-2 small
    assert 1.0e9 < accounting.num_parameters(model_config("llama-1b")) < 1.2e9
    assert accounting.num_parameters(model_config("gpt2-1.5b")) == 1_557_611_200  # GPT-2 XL


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "vaswani-tiny"])
def test_flops_per_token_equals_counted_flops(preset):
    """Forward + backward FLOPs counted by torch equal 6N + 12 * L * H * hd * T per token."""
    cfg = model_config(preset, attention_impl="reference", dropout=0.0)  # CPU SDPA is not counted
    model = Transformer(cfg)
    B, T = 2, 24
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    assert counter.get_total_flops() == pytest.approx(model.flops_per_token(T) * B * T, rel=1e-9)
    expected = 6 * accounting.matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
    assert model.flops_per_token(T) == expected
    # the attention term grows linearly with the context
    assert accounting.flops_per_token(cfg, 2 * T) - accounting.flops_per_token(cfg, T) == 12 * cfg.n_layer * cfg.d_model * T


def test_mfu_is_achieved_over_peak():
    cfg = model_config("gpt2-124m")
    model_flops = accounting.flops_per_token(cfg, 1024)
    assert accounting.mfu(cfg, 1000.0, 1000.0 * model_flops) == pytest.approx(1.0)
    assert accounting.mfu(cfg, 1000.0, 4000.0 * model_flops) == pytest.approx(0.25)
    assert accounting.peak_flops("h100") == 989e12 and accounting.peak_flops("1.5e12") == 1.5e12
    with pytest.raises(UserError, match="unknown device"):
        accounting.peak_flops("abacus")


def saved_bytes(model: Transformer, idx: torch.Tensor, autocast: bool, checkpointed: bool = False) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            positions = model.default_positions(idx)
            h = model.embed(idx, positions)
            rope, mask = model.attention_inputs(positions)
            for layer in model.layers:
                h = checkpoint(layer, h, rope, mask, use_reentrant=False) if checkpointed else layer(h, rope, mask)
            logits = model.head(h)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
    return sum(seen.values())


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("gpt2-tiny", {}),
        ("llama-tiny", {}),
        ("vaswani-tiny", {}),  # dropout: the attention leaves the fused kernel
        ("llama-tiny", dict(qk_norm=True, activation="relu2", attention_impl="reference")),
        ("gpt2-tiny", dict(norm="rmsnorm", positions="rope", n_kv_head=1)),
    ],
)
@pytest.mark.parametrize("autocast", [True, False])
def test_activation_estimate_matches_saved_tensors(preset, overrides, autocast):
    cfg = model_config(preset, **overrides)
    model = Transformer(cfg).train()
    B, T = 2, 64
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    compute = "bf16" if autocast else "fp32"
    estimate = accounting.saved_activation_bytes(cfg, B, T, compute_dtype=compute)
    assert estimate == pytest.approx(saved_bytes(model, idx, autocast), rel=0.05)
    # with per-block checkpointing only block inputs stay; one block is rebuilt at a time
    per_block = accounting.block_activation_bytes_per_token(cfg, T, 2 if autocast else 4, 4) * B * T
    per_block += accounting.block_matmul_params(cfg) * 2 if autocast else 0  # its bf16 weights
    estimate = accounting.saved_activation_bytes(cfg, B, T, compute_dtype=compute, activation_checkpointing=True)
    assert estimate - per_block == pytest.approx(saved_bytes(model, idx, autocast, checkpointed=True), rel=0.05)


def test_memory_estimate_parts():
    cfg = model_config("llama-1b")
    n = accounting.num_parameters(cfg)
    plain = accounting.memory_estimate(cfg, batch_size=4, seq_len=2048)
    assert plain.weights == plain.grads == 4 * n and plain.optimizer == 8 * n
    ckpt = accounting.memory_estimate(cfg, batch_size=4, seq_len=2048, activation_checkpointing=True)
    assert ckpt.activations < plain.activations / 2
    assert plain.total == plain.weights + plain.grads + plain.optimizer + plain.activations
    muon = accounting.memory_estimate(cfg, batch_size=4, seq_len=2048, optimizer="muon")
    assert 4 * n < muon.optimizer < 8 * n
    double = accounting.memory_estimate(cfg, batch_size=8, seq_len=2048)
    weight_copies = accounting.matmul_params(cfg) * 2  # per step, not per token
    assert double.activations - weight_copies == pytest.approx(2 * (plain.activations - weight_copies))


# -- scratchlm model info ---------------------------------------------------------------------


def model_info(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="scratchlm")
    model_cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["model", "info", *argv])
    return args.func(args)


def test_model_verb_is_registered():
    from scratchlm.cli import VERB_MODULES

    assert "scratchlm.model.cli" in VERB_MODULES


def test_model_info_through_the_scratchlm_command(capsys):
    from scratchlm.cli import main

    assert main(["model", "info", "--preset", "llama-tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == accounting.num_parameters(model_config("llama-tiny"))
    assert main(["model", "info", "--preset", "llama-2b"]) == 2  # a UserError: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error:") and "llama-2b" in err and "Traceback" not in err


def test_model_info_preset_json(capsys):
    assert model_info("--preset", "gpt2-124m", "--batch-size", "4", "--seq-len", "512", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    cfg = model_config("gpt2-124m")
    assert info["parameters"] == accounting.num_parameters(cfg)
    assert info["flops_per_token"] == accounting.flops_per_token(cfg, 512)
    assert info["memory"] == accounting.memory_estimate(cfg, 4, 512).to_dict()
    assert info["memory_with_checkpointing"]["activations"] < info["memory"]["activations"]


def test_model_info_from_recipe_and_run(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "llama-tiny"\nn_layer = 3\n[train]\nseq_len = 32\nmicro_batch_size = 2\n')
    assert model_info("--config", str(recipe), "--set", "model.d_model=128") == 0
    text = capsys.readouterr().out
    assert "3 layers, d_model 128" in text and "batch 2 x 32 tokens" in text and "activations" in text

    run = tmp_path / "run"
    run.mkdir()
    cfg = model_config("gpt2-tiny", n_layer=1)
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {"seq_len": 16}}))
    assert model_info("--model", str(run), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == accounting.num_parameters(cfg) and info["seq_len"] == 16


def test_model_info_bad_input_names_the_problem(tmp_path):
    with pytest.raises(UserError, match="n_layr.*did you mean model.n_layer"):
        model_info("--preset", "gpt2-tiny", "--set", "n_layr=2")
    with pytest.raises(UserError, match="not found: .*config.json"):
        model_info("--model", str(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML.*bad.toml"):
        model_info("--config", str(bad))
