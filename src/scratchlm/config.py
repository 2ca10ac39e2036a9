"""Run configuration: dataclass sections, TOML recipes, and `--set section.key=value` overrides.

A config is a set of named sections (`model`, `train`, `data`, and whatever later stages register
with `register_section`, e.g. `sft`, `dpo`, `parallel`). Each section is a dataclass, so every key
has a type and a default; a recipe in `configs/*.toml` and `--set` overrides only change values.
Unknown sections or keys are errors that name the key and the closest valid ones.

The `model` section is special: it holds `preset` plus overrides of the model's own `ModelConfig`
fields, checked against that dataclass, so the model stays the single source of its field names.

Not for what the configured things do: the trainer, model and data modules read these values.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError

# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class TrainConfig:
    """How to train: batch, budget, optimizer, schedule, precision, evaluation and checkpoints."""

    seq_len: int = 256
    micro_batch_size: int = 16  # sequences per forward/backward pass
    batch_tokens: int = 0  # global batch in tokens; 0 = one micro-batch (no accumulation)
    max_steps: int = 1000
    max_minutes: float = 0.0  # wall-clock budget; 0 = none
    optimizer: str = "adamw"  # adamw | muon (Muon for matrices, AdamW for the rest) | adamw8bit
    lr: float = 3e-4  # AdamW learning rate (and for the non-matrix params under Muon)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of max_steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    dtype: str = "auto"  # fp32 | bf16 | fp16 | auto
    compile: bool = False
    fused_loss: bool = True  # output head + cross-entropy in chunks (no full logits tensor)
    activation_checkpointing: bool = False
    cpu_workers: int = 0  # CPU: threads that split each micro-batch; 0 = auto, 1 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 8
    ckpt_every: int = 200  # 0 = only at the end
    keep_checkpoints: int = 3
    max_bad_steps: int = 3  # NaN/Inf losses in a row before giving up
    peak_tflops: float = 0.0  # for MFU; 0 = a guess from the device
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DataConfig:
    """Where the tokens come from and how windows are drawn."""

    path: str = ""  # dataset dir (the CLI's --data)
    tokenizer: str = ""  # tokenizer dir; "" = DATA/tokenizer (the CLI's --tokenizer)
    mode: str = "random"  # random | sequential
    doc_mask: bool = False  # keep attention inside packed documents


@dataclass
class ModelSection:
    """`preset` plus overrides of `ModelConfig` fields (checked against that dataclass)."""

    preset: str | None = "gpt2-mini"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """How to spread training over processes (see `scratchlm.train.parallel`, docs/distributed.md)."""

    mode: str = "auto"  # auto | none | ddp | fsdp | pipeline (auto: ddp under torchrun, else none)
    pipeline_schedule: str = "1f1b"  # gpipe | 1f1b
    pipeline_microbatches: int = 0  # 0 = the accumulation steps (at least the number of stages)
    fsdp_param_dtype: str = "auto"  # auto (= train.dtype) | fp32 | bf16 | fp16: FSDP2 mixed precision
    fsdp_reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class EvalConfig:
    """Benchmark tasks scored at every evaluation during training (a small fixed subset)."""

    tasks_dir: str = ""  # a suite dir with tasks.json (see scratchlm.eval); "" = none
    tasks: list[str] = field(default_factory=list)  # labels; empty = every task in the suite
    limit: int = 20  # examples per task, so the check stays cheap


SECTIONS: dict[str, type] = {"model": ModelSection, "train": TrainConfig, "data": DataConfig,
                             "parallel": ParallelConfig, "eval": EvalConfig}

# Keys whose value must be one of a few words (checked when set, so a typo fails at once).
CHOICES: dict[str, tuple[str, ...]] = {
    "train.optimizer": ("adamw", "muon", "adamw8bit"),
    "parallel.mode": ("auto", "none", "ddp", "fsdp", "pipeline"),
    "parallel.pipeline_schedule": ("gpipe", "1f1b"),
    "parallel.fsdp_param_dtype": ("auto", "fp32", "bf16", "fp16"),
    "parallel.fsdp_reduce_dtype": ("fp32", "bf16", "fp16"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.dtype": ("auto", "fp32", "bf16", "fp16"),
    "data.mode": ("random", "sequential"),
}


def register_section(name: str, cls: type) -> None:
    """Let a later stage add its own section (e.g. `sft`, `dpo`, `parallel`)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r} must be a dataclass")
    SECTIONS[name] = cls


class Config:
    """The resolved configuration: one dataclass instance per section, as attributes."""

    def __init__(self, sections: dict[str, Any] | None = None):
        self._sections: dict[str, Any] = {name: cls() for name, cls in SECTIONS.items()}
        for name, value in (sections or {}).items():
            self._sections[name] = value

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        if name in SECTIONS:  # registered after this config was made
            sections[name] = SECTIONS[name]()
            return sections[name]
        raise AttributeError(name)

    def section_names(self) -> list[str]:
        return list(self._sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; the model section is flattened to `{"preset", **overrides}`."""
        out: dict[str, Any] = {}
        for name, section in self._sections.items():
            if isinstance(section, ModelSection):
                out[name] = {"preset": section.preset, **section.overrides}
            else:
                out[name] = dataclasses.asdict(section)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"


# ---------------------------------------------------------------------------------------------
# Building a config


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then `base` (a dict, e.g. a saved config.json), then a TOML recipe, then `--set`s."""
    config = Config()
    if base:
        apply_dict(config, base, source="saved config")
    if path:
        recipe_path = resolve_recipe(path)
        apply_dict(config, read_toml(recipe_path), source=str(recipe_path))
    for item in overrides:
        apply_override(config, item)
    return config


def config_from_dict(d: dict[str, Any], source: str = "config") -> Config:
    config = Config()
    apply_dict(config, d, source=source)
    return config


RECIPE_DIRS = [
    Path(__file__).resolve().parent / "configs",  # installed with the package
    Path(__file__).resolve().parents[2] / "configs",  # the repository's configs/
]


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path as given, or a bare name (`gpt2-124m`) looked up in `configs/`."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name if p.suffix == ".toml" else p.name + ".toml"
    for directory in RECIPE_DIRS:
        if (directory / name).is_file():
            return directory / name
    known = sorted({f.stem for d in RECIPE_DIRS if d.is_dir() for f in d.glob("*.toml")})
    raise UserError(f"config file not found: {path} (recipes: {', '.join(known) or 'none'})")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file is not valid TOML: {path}: {e}") from None


def apply_dict(config: Config, d: dict[str, Any], source: str) -> None:
    """Set every `section.key` in a nested dict, with the same checks as `--set`."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: expected a table of sections")
    for section_name, values in d.items():
        _check_section(section_name, source)
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{section_name}] must be a table, got {values!r}")
        for key, value in values.items():
            set_value(config, section_name, key, value, source)


def apply_override(config: Config, item: str) -> None:
    """One `section.key=value` from the command line; the value is parsed by the key's type."""
    if "=" not in item:
        raise UserError(f"--set expects section.key=value, got {item!r}")
    dotted, raw = item.split("=", 1)
    if "." not in dotted:
        raise UserError(f"--set expects section.key=value, got {item!r} (no section)")
    section_name, key = dotted.strip().split(".", 1)
    set_value(config, section_name, key.strip(), raw.strip(), source="--set", from_text=True)


def set_value(
    config: Config, section_name: str, key: str, value: Any, source: str, from_text: bool = False
) -> None:
    _check_section(section_name, source)
    section = getattr(config, section_name)
    if isinstance(section, ModelSection):
        _set_model_value(section, key, value, source, from_text)
        return
    types_ = _field_types(type(section))
    if key not in types_:
        raise UserError(_unknown_key_message(source, section_name, key, list(types_)))
    value = coerce(value, types_[key], f"{section_name}.{key}", source, from_text)
    choices = CHOICES.get(f"{section_name}.{key}")
    if choices and value not in choices:
        raise UserError(
            f"{source}: {section_name}.{key} must be one of {', '.join(choices)}; got {value!r}"
        )
    setattr(section, key, value)


def _set_model_value(section: ModelSection, key: str, value: Any, source: str, from_text: bool):
    if key == "preset":
        section.preset = coerce(value, str | None, "model.preset", source, from_text)
        return
    types_ = model_field_types()
    if key not in types_:
        raise UserError(_unknown_key_message(source, "model", key, ["preset", *types_]))
    section.overrides[key] = coerce(value, types_[key], f"model.{key}", source, from_text)


def model_field_types() -> dict[str, Any]:
    """Field name -> type of the model's `ModelConfig` (imported lazily: the model is heavy)."""
    from scratchlm.model.config import ModelConfig

    return _field_types(ModelConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _check_section(name: str, source: str) -> None:
    if name not in SECTIONS:
        raise UserError(_unknown_key_message(source, None, name, list(SECTIONS)))


def _unknown_key_message(source: str, section: str | None, key: str, valid: list[str]) -> str:
    what = f"{section}.{key}" if section else key
    kind = "key" if section else "section"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join((f'{section}.' if section else '') + c for c in close)}?"
    return f"{source}: unknown config {kind} {what!r}" + (hint if close else "") + (
        f" (valid: {', '.join(valid)})" if not close and len(valid) <= 40 else ""
    )


# ---------------------------------------------------------------------------------------------
# Type coercion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, type_: Any, key: str, source: str, from_text: bool = False) -> Any:
    """Turn `value` (a TOML value, or command-line text) into `type_`, or a UserError naming key."""
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, source, from_text)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{source}: bad value for {key}: {value!r}")
    if typing.get_origin(type_) is typing.Literal:
        choices = typing.get_args(type_)
        if value in choices or (from_text and str(value) in map(str, choices)):
            return next(c for c in choices if str(c) == str(value))
        raise UserError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if type_ is Any:
        return value
    try:
        if type_ is bool:
            return _to_bool(value)
        if type_ is int:
            return _to_int(value)
        if type_ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin in (list, tuple):
            items = _to_list(value)
            item_type = args[0] if args else Any
            return origin(coerce(v, item_type, key, source, from_text) for v in items)
    except (ValueError, TypeError):
        name = getattr(type_, "__name__", str(type_))
        raise UserError(f"{source}: {key} expects {name}, got {value!r}") from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            number = float(text)  # allows 1e6 and 2**20-free forms like 1048576.0
            if number.is_integer():
                return int(number)
    raise ValueError


def _to_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return list(json.loads(text))
        return [v.strip() for v in text.split(",") if v.strip()]
    raise ValueError
