"""Hugging Face interop against transformers itself as the oracle: exported gpt2/llama models give
the same logits and greedy tokens in transformers, what transformers saves imports back to the same
logits, export -> import is lossless, and switches HF lacks are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.infer.generate import generate_ids
from scratchlm.interop.hf import export_hf, export_model_hf, import_hf, load_hf_model, tokenizer_from_hf
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.runs import load_run, save_run

transformers = pytest.importorskip("transformers")

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared machine two OpenMP threads
    spin-waiting on each other make each forward ~50x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. 12345 émigré — naïve café ☕ 🙂"
)


@pytest.fixture(scope="module")
def tokenizer():
    from scratchlm.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train([TEXT] * 4, vocab_size=320, progress=False)


def make_model(preset: str, vocab_size: int, seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # A larger init spread than training uses, so greedy continuations are varied, not one token.
    config = model_config(preset, vocab_size=vocab_size, max_seq_len=96, init_std=0.2, **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():  # norms and biases away from 1/0 so a transposed or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


SHAPES = [
    ("gpt2", dict(n_layer=2, n_head=4, d_model=64)),
    ("gpt2", dict(n_layer=3, n_head=2, d_model=48, tie_embeddings=False, gelu_approximation="none")),
    ("llama", dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64)),
    ("llama", dict(n_layer=3, n_head=4, n_kv_head=1, d_model=32, tie_embeddings=True, rope_theta=500.0)),
]


@pytest.mark.parametrize("preset,shape", SHAPES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(SHAPES)])
def test_export_matches_transformers_logits_and_greedy(preset, shape, tokenizer, tmp_path):
    model = make_model(preset, tokenizer.vocab_size, seed=len(shape), **shape)
    export_model_hf(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected_class = "GPT2LMHeadModel" if preset == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    ids = torch.tensor([tokenizer.encode(TEXT)[:40]])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()

    prompt = ids[:, :8]
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(prompt))
    ours_out = generate_ids(model, [prompt[0].tolist()], max_new_tokens=24)[0]
    assert hf_out[0, 8:].tolist() == ours_out
    assert len(set(ours_out)) > 3  # the comparison is not between two runs of one repeated token


def test_exported_tokenizer_loads_in_transformers_with_chat_template(tokenizer, tmp_path):
    from scratchlm.posttrain.chat_template import add_chat_tokens, render_chat, render_text

    tok = type(tokenizer).from_json(tokenizer.to_json())
    add_chat_tokens(tok)
    model = make_model("llama", tok.vocab_size, seed=0, n_layer=1, n_head=2, n_kv_head=1, d_model=32)
    export_model_hf(model, tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode(TEXT) == tok.encode(TEXT)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False)
    assert rendered == render_text(messages)
    assert hf_tok.encode(rendered) == render_chat(tok, messages).ids


@pytest.mark.parametrize("preset,shape", SHAPES[::2], ids=["gpt2", "llama"])
def test_import_what_transformers_saved(preset, shape, tokenizer, tmp_path):
    model = make_model(preset, tokenizer.vocab_size, seed=7, **shape)
    export_model_hf(model, tokenizer, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "saved")  # transformers' own writer: its names, its tying
    transformers.AutoTokenizer.from_pretrained(tmp_path / "export").save_pretrained(tmp_path / "saved")
    run = load_run(import_hf(tmp_path / "saved", tmp_path / "run"))
    ids = torch.tensor([tokenizer.encode(TEXT)[:32]])
    with torch.no_grad():
        assert torch.allclose(run.model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert run.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


@pytest.mark.parametrize("preset,shape", SHAPES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(SHAPES)])
def test_export_import_is_lossless(preset, shape, tokenizer, tmp_path):
    model = make_model(preset, tokenizer.vocab_size, seed=3, **shape)
    save_run(tmp_path / "run", model, tokenizer, {"model": model.config.to_dict()})
    export_hf(tmp_path / "run", tmp_path / "hf")
    back = load_run(import_hf(tmp_path / "hf", tmp_path / "run2"))
    original = model.state_dict()
    restored = back.model.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    # Everything that decides encoding survives (the learned-merge log is not part of HF's file).
    for key in ("vocab", "pattern", "special_tokens"):
        assert back.tokenizer.to_json()[key] == tokenizer.to_json()[key], key
    for field in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "tie_embeddings", "activation",
                  "gelu_approximation", "rope_theta", "norm_eps", "bias", "positions", "norm"):
        assert getattr(back.model.config, field) == getattr(model.config, field), field


def test_gpt2_layout_tokenizer_is_remapped_with_embedding_rows(tokenizer, tmp_path):
    """A GPT-2-style file numbers bytes in its printable-alphabet order: import renumbers to ours
    and moves the embedding rows with the ids, so the same text gives the same logits."""
    from scratchlm.tokenizer.formats import bytes_to_text

    model = make_model("gpt2", tokenizer.vocab_size, seed=5, n_layer=1, n_head=2, d_model=32)
    export_model_hf(model, tokenizer, tmp_path)
    # Renumber: byte tokens sorted by their printable character (GPT-2's layout), the rest as is.
    vocab_bytes = [tokenizer.token_bytes(i) for i in range(256)]
    byte_order = sorted(range(256), key=lambda b: bytes_to_text(vocab_bytes[b]))
    ours_to_hf = list(range(tokenizer.vocab_size))
    for new, old in enumerate(byte_order):
        ours_to_hf[old] = new
    tok_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tok_json["model"]["vocab"] = {t: ours_to_hf[i] for t, i in tok_json["model"]["vocab"].items()}
    tok_json["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                 "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    perm = torch.argsort(torch.tensor(ours_to_hf))  # hf id -> our id
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"][perm].contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    imported, hf_to_ours = tokenizer_from_hf(tmp_path / "tokenizer.json")
    assert [hf_to_ours[ours_to_hf[i]] for i in range(tokenizer.vocab_size)] == list(range(tokenizer.vocab_size))
    run = load_run(import_hf(tmp_path, tmp_path / "run"))
    text = "a single man in possession of a good fortune"
    from tokenizers import Tokenizer

    hf_ids = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids
    assert [hf_to_ours[i] for i in hf_ids] == run.tokenizer.encode(text)
    ids = torch.tensor([run.tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.allclose(run.model(ids), model(ids), atol=1e-5)


@pytest.mark.parametrize(
    "preset,overrides,switch",
    [
        ("vaswani", {}, "norm_position|positions"),
        ("llama", {"qk_norm": True}, "qk_norm"),
        ("gpt2", {"n_kv_head": 1}, "n_kv_head"),
        ("llama", {"norm": "layernorm"}, "norm"),
        ("gpt2", {"bias": False}, "bias"),
        ("llama", {"positions": "none"}, "positions"),
    ],
)
def test_switches_without_hf_equivalent_are_refused_by_name(preset, overrides, switch, tmp_path):
    model = Transformer(model_config(f"{preset}-tiny", n_layer=1, **overrides))
    with pytest.raises(UserError, match=rf"model\.({switch})="):
        export_model_hf(model, None, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_import_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_hf_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1,
                                                      "n_head": 1, "n_embd": 8, "n_positions": 8}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickles are not loaded"):
        load_hf_model(tmp_path)


def test_cli_export_import_round_trip_and_refusal(tokenizer, tmp_path, capsys):
    from scratchlm.cli import main

    model = make_model("llama", tokenizer.vocab_size, seed=11, n_layer=1, n_head=2, n_kv_head=1, d_model=32)
    save_run(tmp_path / "run", model, tokenizer, {"model": model.config.to_dict()})
    assert main(["export", "--model", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert main(["import", "--format", "hf", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_run(tmp_path / "back")
    ids = torch.tensor([tokenizer.encode(TEXT)[:16]])
    with torch.no_grad():
        assert torch.equal(back.model(ids), model(ids))

    post_ln = Transformer(model_config("vaswani-tiny", vocab_size=tokenizer.vocab_size, n_layer=1))
    save_run(tmp_path / "vaswani", post_ln, tokenizer, {"model": post_ln.config.to_dict()})
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "vaswani"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.positions='sinusoidal'" in err
