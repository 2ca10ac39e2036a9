"""Config: defaults < recipe < --set, types coerced per key, unknown keys named with suggestions,
every recipe in configs/ valid, and a config survives its own JSON form."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.config import (SECTIONS, Config, TrainConfig, config_from_dict, load_config,
                              register_section)
from scratchlm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.toml"))

# keys issue 4 says scripts rely on
REQUIRED_KEYS = ["model.preset", "model.n_layer", "model.n_head", "model.n_kv_head", "model.d_model",
                 "train.seq_len", "train.micro_batch_size", "train.batch_tokens", "train.max_steps",
                 "train.max_minutes", "train.lr", "train.warmup_steps", "train.optimizer",
                 "train.dtype", "train.compile", "train.eval_every", "train.ckpt_every", "train.seed"]


def test_every_required_key_can_be_set():
    for key in REQUIRED_KEYS:
        load_config(None, [f"{key}={'adamw' if key == 'train.optimizer' else 'bf16' if key == 'train.dtype' else 'llama-tiny' if key == 'model.preset' else 'true' if key == 'train.compile' else '4'}"])


def test_overrides_are_coerced_to_each_keys_type():
    c = load_config(None, ["train.max_steps=1_000", "train.lr=3e-4", "train.compile=yes",
                           "train.max_minutes=2", "model.n_kv_head=2", "model.preset=llama-tiny",
                           "train.batch_tokens=5e5"])
    assert c.train.max_steps == 1000 and isinstance(c.train.max_steps, int)
    assert c.train.lr == 3e-4 and c.train.compile is True
    assert c.train.max_minutes == 2.0 and isinstance(c.train.max_minutes, float)
    assert c.model.overrides == {"n_kv_head": 2} and c.model.preset == "llama-tiny"
    assert c.train.batch_tokens == 500000


def test_recipe_then_overrides_win_in_order(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "llama-tiny"\nd_model = 96\n[train]\nlr = 0.01\nmax_steps = 7\n')
    c = load_config(recipe, ["train.lr=0.5"])
    assert c.model.preset == "llama-tiny" and c.model.overrides == {"d_model": 96}
    assert c.train.lr == 0.5 and c.train.max_steps == 7
    assert c.train.seq_len == TrainConfig().seq_len  # untouched keys keep their defaults


@pytest.mark.parametrize("item, named, suggested", [
    ("train.learning_rate=1", "train.learning_rate", None),
    ("train.max_step=1", "train.max_step", "train.max_steps"),
    ("trian.lr=1", "trian", "train"),
    ("model.n_layers=2", "model.n_layers", "model.n_layer"),
    ("model.dmodel=64", "model.dmodel", "model.d_model"),
])
def test_unknown_keys_are_named_with_the_closest_valid_ones(item, named, suggested):
    with pytest.raises(UserError) as e:
        load_config(None, [item])
    message = str(e.value)
    assert repr(named) in message or named in message
    if suggested:
        assert f"did you mean {suggested}" in message or suggested in message.split("did you mean")[1]
    assert "\n" not in message


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[train]\nwarmup = 10\n")
    with pytest.raises(UserError, match=r"bad\.toml.*train\.warmup.*train\.warmup_steps"):
        load_config(recipe)


@pytest.mark.parametrize("item, fragment", [
    ("train.max_steps=ten", "train.max_steps expects int"),
    ("train.max_steps=1.5", "train.max_steps expects int"),
    ("train.compile=maybe", "train.compile expects bool"),
    ("train.optimizer=sgd", "train.optimizer must be one of adamw, muon"),
    ("train.dtype=fp8", "train.dtype must be one of"),
    ("train.lr", "section.key=value"),
    ("lr=1", "no section"),
])
def test_bad_values_are_one_line_errors_naming_the_key(item, fragment):
    with pytest.raises(UserError, match=fragment):
        load_config(None, [item])


def test_bad_toml_and_missing_recipe_are_user_errors(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads_by_path_and_by_name_and_resolves_its_model(recipe):
    from scratchlm.train.pretrain import resolve_model_config

    c = load_config(recipe)
    assert load_config(recipe.stem) == c
    model = resolve_model_config(c, vocab_size=512, seq_len=c.train.seq_len)
    assert model.max_seq_len >= c.train.seq_len
    if c.train.batch_tokens:
        assert c.train.batch_tokens % (c.train.seq_len * c.train.micro_batch_size) == 0


def test_config_survives_its_json_form():
    c = load_config(None, ["model.preset=llama-tiny", "model.n_kv_head=1", "train.compile=true",
                           "train.optimizer=muon", "data.mode=sequential"])
    assert config_from_dict(c.to_dict()) == c
    assert load_config(None, [], base=c.to_dict()) == c


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=10**9), st.floats(min_value=1e-9, max_value=10.0),
       st.booleans())
def test_command_line_text_round_trips_typed_values(steps, lr, compile_):
    c = load_config(None, [f"train.max_steps={steps}", f"train.lr={lr!r}", f"train.compile={compile_}"])
    assert (c.train.max_steps, c.train.lr, c.train.compile) == (steps, lr, compile_)


def test_later_stages_can_register_their_own_section():
    @dataclass
    class ToySection:
        beta: float = 0.1
        loss: str = "sigmoid"

    register_section("toy_test_section", ToySection)
    try:
        c = load_config(None, ["toy_test_section.beta=0.5"])
        assert c.toy_test_section.beta == 0.5 and c.to_dict()["toy_test_section"]["loss"] == "sigmoid"
        with pytest.raises(UserError, match="toy_test_section.betta.*toy_test_section.beta"):
            load_config(None, ["toy_test_section.betta=1"])
    finally:
        SECTIONS.pop("toy_test_section")
    assert "toy_test_section" not in Config().to_dict()
