"""Model configuration: the `ModelConfig` dataclass, the named presets, and how they resolve.

A config fully describes one Transformer architecture (the switches the literature compares:
norm type and placement, positions, activation, attention heads, QK-norm, bias, tied embeddings)
and is stored as plain JSON in a run's `config.json`. Presets are a family (`vaswani`, `gpt2`,
`llama`) plus an optional size (`gpt2-tiny`, `gpt2-124m`, `llama-1b`, ...).
Not for training settings (see `scratchlm.config` / `scratchlm.train`) nor for building the model
(see `scratchlm.model.transformer`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from scratchlm.errors import UserError

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned", "rope", "none")
ACTIVATIONS = ("relu", "gelu", "swiglu", "relu2")
GELU_APPROXIMATIONS = ("tanh", "none")
INITS = ("normal", "xavier")
ATTENTION_IMPLS = ("sdpa", "reference")


@dataclass
class ModelConfig:
    """One decoder-only Transformer. `d_ff` and `n_kv_head` left as None are derived."""

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 -> MQA; in between -> GQA
    d_model: int = 768
    d_ff: int | None = None  # None -> 4*d_model, or ~8/3*d_model for SwiGLU (same parameters)
    max_seq_len: int = 1024
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rope_theta: float = 10000.0
    activation: str = "gelu"
    gelu_approximation: str = "tanh"  # GPT-2's "gelu_new"; "none" is the exact erf form
    qk_norm: bool = False
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    init: str = "normal"  # "normal": N(0, init_std); "xavier": Xavier-uniform (Vaswani et al.)
    init_std: float = 0.02
    scale_residual_init: bool = True  # residual output projections get std/sqrt(2*n_layer)
    attention_impl: str = "sdpa"
    preset: str | None = field(default=None, compare=False)  # the name it was built from, if any

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.activation)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        """Raise a UserError naming the first field that does not make sense."""
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "dropout", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"model.{name} must be a number, got {value!r}")
        for name in ("qk_norm", "bias", "tie_embeddings", "scale_embeddings", "scale_residual_init"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        choices = {
            "norm": NORMS,
            "norm_position": NORM_POSITIONS,
            "positions": POSITIONS,
            "activation": ACTIVATIONS,
            "gelu_approximation": GELU_APPROXIMATIONS,
            "init": INITS,
            "attention_impl": ATTENTION_IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.d_model % self.n_head:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.positions == "rope" and self.head_dim % 2:
            raise UserError(f"model.positions=rope needs an even head_dim, got {self.head_dim}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise UserError(f"model.positions=sinusoidal needs an even d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise UserError("model.norm_eps, model.rope_theta and model.init_std must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a dict (e.g. a run's config.json "model" section); unknown keys are errors."""
        if not isinstance(d, dict):
            raise UserError(f"model config must be a JSON object, got {type(d).__name__}")
        check_known_fields(d)
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (derived fields re-derived only if passed as None)."""
        check_known_fields(changes)
        return dataclasses.replace(self, **changes)


def default_d_ff(d_model: int, activation: str) -> int:
    """4*d_model; for SwiGLU 2/3 of that (three matrices instead of two), rounded up to 32."""
    if activation == "swiglu":
        hidden = int(8 * d_model / 3)
        return (hidden + 31) // 32 * 32
    return 4 * d_model


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def check_known_fields(d: dict[str, Any]) -> None:
    known = field_names()
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join('model.' + c for c in close)}?)" if close else ""
            raise UserError(f"unknown model config key model.{key}{hint}")


# A family fixes the architecture; a size fixes the shape. "gpt2" alone is gpt2-124m, etc.
FAMILIES: dict[str, dict[str, Any]] = {
    # Vaswani et al. 2017, "Attention is all you need": post-LN, sinusoidal positions, ReLU,
    # embeddings scaled by sqrt(d_model) and shared with the pre-softmax projection.
    "vaswani": dict(
        norm="layernorm", norm_position="post", positions="sinusoidal", activation="relu",
        bias=True, tie_embeddings=True, scale_embeddings=True, init="xavier",
        scale_residual_init=False, dropout=0.1, norm_eps=1e-5,
    ),
    # Radford et al. 2019: pre-LN, learned positions, tanh-GELU, tied, N(0, 0.02) + scaled residuals.
    "gpt2": dict(
        norm="layernorm", norm_position="pre", positions="learned", activation="gelu",
        gelu_approximation="tanh", bias=True, tie_embeddings=True, init="normal",
        init_std=0.02, scale_residual_init=True, dropout=0.0, norm_eps=1e-5,
    ),
    # Touvron et al. 2023: RMSNorm (pre), RoPE, SwiGLU, GQA, no biases, untied embeddings.
    "llama": dict(
        norm="rmsnorm", norm_position="pre", positions="rope", activation="swiglu",
        bias=False, tie_embeddings=False, init="normal", init_std=0.02,
        scale_residual_init=True, dropout=0.0, norm_eps=1e-5, rope_theta=10000.0,
    ),
}

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "vaswani": {
        "tiny": dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=256, max_seq_len=128),
        "base": dict(vocab_size=37000, n_layer=6, n_head=8, d_model=512, d_ff=2048, max_seq_len=512),
        "big": dict(vocab_size=37000, n_layer=6, n_head=16, d_model=1024, d_ff=4096, max_seq_len=512,
                    dropout=0.3),
    },
    "gpt2": {
        "tiny": dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=128),
        # the shape nanoGPT is benchmarked at on CPU in issue 4
        "mini": dict(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_seq_len=256),
        "124m": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
        "350m": dict(vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
        "774m": dict(vocab_size=50257, n_layer=36, n_head=20, d_model=1280, max_seq_len=1024),
        "1.5b": dict(vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024),
    },
    "llama": {
        "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128),
        "mini": dict(vocab_size=8192, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256),
        "60m": dict(vocab_size=32000, n_layer=8, n_head=8, n_kv_head=4, d_model=512, max_seq_len=1024),
        # Llama-3.2-1B's shape with a 32k vocabulary and untied embeddings: ~1.1B parameters
        "1b": dict(vocab_size=32000, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192,
                   max_seq_len=2048, rope_theta=500000.0),
    },
}
DEFAULT_SIZE = {"vaswani": "base", "gpt2": "124m", "llama": "1b"}

PRESETS: list[str] = list(FAMILIES) + [f"{fam}-{size}" for fam, sizes in SIZES.items() for size in sizes]


def preset_fields(preset: str) -> dict[str, Any]:
    """The field values a preset name stands for (family defaults, then the size)."""
    family, _, size = preset.partition("-")
    if family not in FAMILIES or (size and size not in SIZES[family]):
        close = difflib.get_close_matches(preset, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model preset {preset!r}{hint}; presets: {', '.join(PRESETS)}")
    return {**FAMILIES[family], **SIZES[family][size or DEFAULT_SIZE[family]]}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """Resolve a preset plus overrides, e.g. `model_config("gpt2", n_layer=2, d_model=64)`.

    A derived field (d_ff, n_kv_head) that the size fixed is re-derived when the override
    changes what it derives from, so `model_config("llama-1b", d_model=256)` stays consistent.
    """
    check_known_fields(overrides)
    fields = preset_fields(preset)
    if "d_ff" not in overrides and ("d_model" in overrides or "activation" in overrides):
        fields.pop("d_ff", None)
    if "n_kv_head" not in overrides and "n_head" in overrides and "n_kv_head" in fields:
        # keep the preset's grouping ratio (queries per key/value head) where it still divides
        ratio = fields["n_head"] // fields["n_kv_head"]
        n_head = overrides["n_head"]
        fields["n_kv_head"] = n_head // ratio if n_head % ratio == 0 else n_head
    fields.update(overrides)
    fields["preset"] = preset
    return ModelConfig(**fields)


def config_from_mapping(d: dict[str, Any], where: str = "model config") -> ModelConfig:
    """A config from a recipe's or run's "model" table: a preset name plus overrides, or every
    field (a saved `to_dict()`, which may name the preset it came from)."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: the model section must be a table/object, got {type(d).__name__}")
    fields = dict(d)
    preset = fields.pop("preset", None)
    try:
        if preset:
            return model_config(preset, **fields)
        return ModelConfig.from_dict(fields)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except TypeError as e:  # a value of the wrong type that the dataclass choked on
        raise UserError(f"{where}: {e}") from None
