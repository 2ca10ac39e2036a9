"""Hugging Face interop: a run as a transformers checkpoint, and a transformers checkpoint as a run.

Export writes what `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load: `model.safetensors`, `config.json`, `generation_config.json`, and the tokenizer files
(`tokenizer.json`, `tokenizer_config.json` with the chat template when the run has one).
- learned positions, LayerNorm, GELU/ReLU/ReLU² -> `GPT2LMHeadModel` (its `Conv1D` layers store
  weights as [in, out], so ours are transposed, and q/k/v are fused into one `c_attn`);
- RoPE, RMSNorm, SwiGLU -> `LlamaForCausalLM` (our RoPE already uses its rotate-half layout, so
  the weights map by name alone).
A model with a switch neither architecture has (post-LN, QK-norm, sinusoidal positions, ...) is
refused with a message naming the switch. Import is the inverse for local GPT-2- and
Llama-architecture checkpoints (safetensors, one file or sharded) and their `tokenizer.json`.
Nothing here touches the network or unpickles anything; transformers itself is not needed.
Not for GGUF (see `scratchlm.interop.gguf`) or for the tokenizer's own formats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from scratchlm.errors import UserError
from scratchlm.files import atomic_write, atomic_write_json, read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPT2_ACTIVATIONS = {("gelu", "tanh"): "gelu_pytorch_tanh", ("gelu", "none"): "gelu", ("relu", None): "relu",
                    ("relu2", None): "relu2"}
GPT2_ACTIVATIONS_IN = {
    "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_fast": ("gelu", "tanh"),
    "gelu": ("gelu", "none"), "relu": ("relu", "tanh"), "relu2": ("relu2", "tanh"),
}


# ---- which HF architecture a config is ------------------------------------------------------


def hf_architecture(config) -> str:
    """"gpt2" or "llama" for a `ModelConfig`, or a UserError naming the switch HF cannot express."""
    if config.positions == "learned":
        family, required = "gpt2", {"norm": "layernorm", "norm_position": "pre", "bias": True}
        if config.activation not in ("gelu", "relu", "relu2"):
            _refuse(config, "activation", "GPT2LMHeadModel supports gelu, relu or relu2")
        if config.n_kv_head != config.n_head:
            _refuse(config, "n_kv_head", "GPT2LMHeadModel has no grouped-query attention (needs n_kv_head = n_head)")
    elif config.positions == "rope":
        family, required = "llama", {"norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu"}
    else:
        _refuse(config, "positions", "HF export supports learned (GPT-2) or rope (Llama) positions")
    required.update(qk_norm=False, scale_embeddings=False)
    for name, value in required.items():
        if getattr(config, name) != value:
            _refuse(config, name, f"the {family} architecture needs model.{name}={value!r}")
    return family


def _refuse(config, name: str, why: str) -> None:
    raise UserError(f"cannot export to Hugging Face: model.{name}={getattr(config, name)!r} has no "
                    f"equivalent ({why})")


# ---- configs --------------------------------------------------------------------------------


def hf_config(config, family: str, eot_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json for transformers, from a `ModelConfig`."""
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id} if eot_id is not None else {}
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_embd": config.d_model,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
            "activation_function": GPT2_ACTIVATIONS[(config.activation, config.gelu_approximation
                                                      if config.activation == "gelu" else None)],
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps, "initializer_range": config.init_std,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": config.tie_embeddings,
            "dtype": dtype, **special,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        # rope_theta for transformers < 5, rope_parameters for >= 5
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias, "mlp_bias": config.bias, "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "dtype": dtype, **special,
    }


def model_config_from_hf(hf: dict[str, Any], where: str):
    """A `ModelConfig` for a transformers GPT-2 or Llama config.json (UserError on what we lack)."""
    from scratchlm.model.config import ModelConfig

    kind = hf.get("model_type")
    try:
        if kind == "gpt2":
            return ModelConfig(**_gpt2_fields(hf, where))
        if kind == "llama":
            return ModelConfig(**_llama_fields(hf, where))
    except KeyError as e:
        raise UserError(f"{where}: missing field {e.args[0]!r}") from None
    raise UserError(f"{where}: model_type {kind!r} is not supported (expected 'gpt2' or 'llama')")


def _gpt2_fields(hf: dict, where: str) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS_IN:
        raise UserError(f"{where}: activation_function {act!r} is not supported")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, ok) != ok:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported")
    activation, approximation = GPT2_ACTIVATIONS_IN[act]
    return dict(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf["n_positions"], norm="layernorm",
        norm_position="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
        activation=activation, gelu_approximation=approximation, bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
        preset="gpt2",
    )


def _llama_fields(hf: dict, where: str) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise UserError(f"{where}: rope scaling {rope_type!r} is not supported")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise UserError(f"{where}: attention_bias != mlp_bias is not supported (one bias switch)")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
        raise UserError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return dict(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_position="pre", norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), activation="swiglu",
        bias=bool(hf.get("attention_bias", False)), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02), preset="llama",
    )


# ---- weights --------------------------------------------------------------------------------


def _layer_names(config) -> list[tuple[str, str]]:
    """(our name, HF name) pairs for Llama, one layer-independent list with `{i}` placeholders."""
    pairs = [("attn_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        pairs.append((f"attn.{proj}.weight", f"self_attn.{proj}.weight"))
        if config.bias:
            pairs.append((f"attn.{proj}.bias", f"self_attn.{proj}.bias"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        pairs.append((f"mlp.{proj}.weight", f"mlp.{proj}.weight"))
        if config.bias:
            pairs.append((f"mlp.{proj}.bias", f"mlp.{proj}.bias"))
    return pairs


def llama_state_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        for ours, theirs in _layer_names(config):
            out[f"model.layers.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
    return out


def llama_state_from_hf(hf: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    state["lm_head.weight"] = hf["model.embed_tokens.weight"] if config.tie_embeddings else hf["lm_head.weight"]
    for i in range(config.n_layer):
        for ours, theirs in _layer_names(config):
            state[f"layers.{i}.{ours}"] = hf[f"model.layers.{i}.{theirs}"]
    return state


def gpt2_state_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out = {
        "transformer.wte.weight": state["tok_embeddings.weight"],
        "transformer.wpe.weight": state["pos_embeddings.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": state["norm.bias"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"]
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
        # Conv1D keeps weights as [in, out]: fuse q, k, v along out, then transpose.
        qkv = [state[f"{ours}attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([state[f"{ours}attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")])
        for a, b in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"].t()
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
    return out


def gpt2_state_from_hf(hf: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    # The original GPT-2 checkpoints name weights without the "transformer." prefix.
    if "wte.weight" in hf:
        hf = {(k if k.startswith("lm_head") else f"transformer.{k}"): v for k, v in hf.items()}
    state = {
        "tok_embeddings.weight": hf["transformer.wte.weight"],
        "pos_embeddings.weight": hf["transformer.wpe.weight"],
        "norm.weight": hf["transformer.ln_f.weight"],
        "norm.bias": hf["transformer.ln_f.bias"],
    }
    state["lm_head.weight"] = hf["transformer.wte.weight"] if config.tie_embeddings else hf["lm_head.weight"]
    d = config.d_model
    for i in range(config.n_layer):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            state[f"{ours}{a}.weight"] = hf[f"{theirs}{b}.weight"]
            state[f"{ours}{a}.bias"] = hf[f"{theirs}{b}.bias"]
        weight, bias = hf[f"{theirs}attn.c_attn.weight"].t(), hf[f"{theirs}attn.c_attn.bias"]
        for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{ours}attn.{p}.weight"] = weight[j * d:(j + 1) * d]
            state[f"{ours}attn.{p}.bias"] = bias[j * d:(j + 1) * d]
        for a, b in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            state[f"{ours}{a}.weight"] = hf[f"{theirs}{b}.weight"].t()
            state[f"{ours}{a}.bias"] = hf[f"{theirs}{b}.bias"]
    return state


TO_HF = {"gpt2": gpt2_state_to_hf, "llama": llama_state_to_hf}
FROM_HF = {"gpt2": gpt2_state_from_hf, "llama": llama_state_from_hf}


# ---- export ---------------------------------------------------------------------------------


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write run `run_dir` as a transformers checkpoint in `out_dir`; returns `out_dir`."""
    from scratchlm.runs import load_run

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    run = load_run(run_dir)
    return export_model_hf(run.model, run.tokenizer, out_dir, dtype=dtype)


def export_model_hf(model, tokenizer, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a model (and its tokenizer, if given) as a transformers checkpoint in `out_dir`."""
    from safetensors.torch import save

    config = model.config
    family = hf_architecture(config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if any(not v.is_floating_point() for v in state.values()):
        raise UserError("cannot export a quantized model to Hugging Face; export the unquantized run")
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in TO_HF[family](state, config).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": "pt"})
    atomic_write(out / "model.safetensors", lambda f: f.write(data), "wb")
    eot_id = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    atomic_write_json(out / "config.json", hf_config(config, family, eot_id, dtype))
    generation = {"bos_token_id": eot_id, "eos_token_id": eot_id} if eot_id is not None else {}
    atomic_write_json(out / "generation_config.json", generation)
    if tokenizer is not None:
        export_tokenizer_hf(tokenizer, out)
    return out


def export_tokenizer_hf(tokenizer, out: Path) -> None:
    """The tokenizer's own HF export, plus the chat template when the tokenizer has chat tokens."""
    from scratchlm.posttrain.chat_template import HF_CHAT_TEMPLATE, has_chat_tokens

    tokenizer.export_hf(out)
    config_path = out / "tokenizer_config.json"
    tok_config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if has_chat_tokens(tokenizer):
        tok_config["chat_template"] = HF_CHAT_TEMPLATE
    atomic_write_json(config_path, tok_config)


# ---- import ---------------------------------------------------------------------------------


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint: one `model.safetensors` or an index of shards."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in src.glob("*.bin"))
        hint = f" (found {bins[0]}: PyTorch pickles are not loaded; convert to safetensors)" if bins else ""
        raise UserError(f"{src}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if Path(name).name != name:
            raise UserError(f"{index}: shard name {name!r} must be a plain file name")
        try:
            tensors.update(load_file(str(src / name)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {src / name}: {e}") from None
    return tensors


def load_hf_model(src: str | os.PathLike):
    """A scratchlm `Transformer` with the weights of a local transformers checkpoint (fp32)."""
    from scratchlm.model.transformer import Transformer

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"Hugging Face checkpoint dir not found: {src}")
    config = model_config_from_hf(read_json(src / "config.json", "Hugging Face config"), str(src / "config.json"))
    hf_state = read_hf_weights(src)
    family = hf_architecture(config)
    try:
        state = FROM_HF[family](hf_state, config)
    except KeyError as e:
        raise UserError(f"{src}: weight {e.args[0]!r} missing from the checkpoint") from None
    model = Transformer(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{src}: weight for {name} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(expected[name].shape)}")
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model.eval()


def import_hf(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Turn a local transformers checkpoint dir (GPT-2 or Llama, safetensors, tokenizer.json)
    into a scratchlm run dir at `out_dir`."""
    from scratchlm.runs import save_run

    src = Path(src)
    model = load_hf_model(src)
    tokenizer = None
    if (src / "tokenizer.json").is_file():
        tokenizer, hf_to_ours = tokenizer_from_hf(src / "tokenizer.json")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"{src}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size} embeddings")
        permute_vocab_rows(model, hf_to_ours)
    config = {"model": model.config.to_dict(), "source": {"format": "hf", "path": str(src.resolve())}}
    return save_run(out_dir, model, tokenizer, config)


@torch.no_grad()
def permute_vocab_rows(model, hf_to_ours: list[int]) -> None:
    """Move embedding and output rows from HF token ids to ours (a no-op for the identity)."""
    if hf_to_ours == list(range(len(hf_to_ours))):
        return
    order = torch.arange(model.config.vocab_size)
    order[torch.tensor(hf_to_ours)] = torch.arange(len(hf_to_ours))  # our id -> HF id
    model.tok_embeddings.weight.copy_(model.tok_embeddings.weight[order])
    if not model.config.tie_embeddings:
        model.lm_head.weight.copy_(model.lm_head.weight[order])


# ---- tokenizer import -----------------------------------------------------------------------


def tokenizer_from_hf(path: Path):
    """Our `BPETokenizer` rebuilt from an HF byte-level BPE `tokenizer.json`.

    Our ids put the 256 single bytes first (id = byte value), then tokens in merge order, then
    special tokens; HF files may order ids differently (GPT-2 numbers bytes by its printable
    alphabet), so this also returns `hf_to_ours`, the new id of every HF id.
    """
    from scratchlm.tokenizer.bpe import BPETokenizer
    from scratchlm.tokenizer.formats import text_to_bytes
    from scratchlm.tokenizer.patterns import GPT2_PATTERN, NO_SPLIT

    where = str(path)
    data = read_json(path, "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{where}: model.type {model.get('type')!r} is not supported (byte-level BPE only)")
    if data.get("normalizer"):
        raise UserError(f"{where}: a normalizer is not supported (byte-level BPE without one only)")
    pattern = _hf_split_pattern(data.get("pre_tokenizer"), where, GPT2_PATTERN, NO_SPLIT)
    vocab_json = model.get("vocab")
    if not isinstance(vocab_json, dict):
        raise UserError(f"{where}: model.vocab must be an object")
    specials = {t["content"]: int(t["id"]) for t in data.get("added_tokens", []) if t.get("special", True)}
    special_ids = set(specials.values())
    by_bytes: dict[bytes, int] = {}
    for text, hf_id in vocab_json.items():
        if hf_id not in special_ids:
            by_bytes[text_to_bytes(text, f"{where}: model.vocab[{text!r}]")] = int(hf_id)
    ours: list[bytes] = [bytes([b]) for b in range(256)]
    missing = [b for b in ours if b not in by_bytes]
    if missing:
        raise UserError(f"{where}: model.vocab lacks the single byte {missing[0]!r} (not byte-level BPE)")
    seen = set(ours)
    merges = []
    for i, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = text_to_bytes(left, f"{where}: merges[{i}]") + text_to_bytes(right, f"{where}: merges[{i}]")
        if token not in seen and token in by_bytes:
            seen.add(token)
            ours.append(token)
    # Tokens no merge produces (rare) go last; only a whole chunk can become one of them.
    ours.extend(sorted((b for b in by_bytes if b not in seen), key=by_bytes.get))
    hf_to_ours = [0] * (max([*by_bytes.values(), *special_ids]) + 1)
    for our_id, token in enumerate(ours):
        hf_to_ours[by_bytes[token]] = our_id
    our_specials = {}
    for content, hf_id in sorted(specials.items(), key=lambda kv: kv[1]):
        our_specials[content] = hf_to_ours[hf_id] = len(ours) + len(our_specials)
    return BPETokenizer(ours, pattern, our_specials), hf_to_ours


def _hf_split_pattern(pre: dict | None, where: str, gpt2_pattern: str, no_split: str) -> str:
    """Our split regex for an HF pre-tokenizer: ByteLevel (GPT-2's regex), or Split + ByteLevel."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    pattern = None
    saw_byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            saw_byte_level = True
            if step.get("add_prefix_space"):
                raise UserError(f"{where}: ByteLevel add_prefix_space=true is not supported")
            if step.get("use_regex", True):
                if pattern is not None:
                    raise UserError(f"{where}: two split regexes are not supported")
                pattern = gpt2_pattern
        elif kind == "Split" and pattern is None and "Regex" in (step.get("pattern") or {}):
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise UserError(f"{where}: Split behavior {step.get('behavior')!r} is not supported")
            pattern = step["pattern"]["Regex"]
        else:
            raise UserError(f"{where}: pre_tokenizer {kind!r} is not supported")
    if not saw_byte_level:
        raise UserError(f"{where}: not a byte-level tokenizer (no ByteLevel pre-tokenizer)")
    return pattern or no_split
