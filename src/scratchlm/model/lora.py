"""LoRA: low-rank adapters wrapped around a model's linear projections from outside.

`apply_lora(model, LoRAConfig(rank, alpha, dropout, target_modules))` replaces each targeted
projection (matched by the last part of its module name: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `up_proj`, `down_proj`) with a `LoRALinear` holding the original module as `base`
and two small matrices, and freezes everything else. The update is

    y = base(x) + (alpha / rank) * B(A(dropout(x))),   A: [rank, in], B: [out, rank], B = 0 at init

so at init the model computes exactly what it did. `merge`/`unmerge` fold the update into the
base weight and back; `merged_state_dict(model)` gives the plain model's state dict (same keys
as before LoRA) with the adapters folded in; `lora_state_dict` / `save_adapters` /
`load_adapters` handle the adapters alone. `adapters_disabled(model)` switches them off, which
turns the policy back into its base model (DPO's reference).

QLoRA seam: `base` only has to be a module mapping [..., in] -> [..., out] with `in_features`
and `out_features`; a frozen INT8/INT4 module from `scratchlm.model.quant` fits. Merging needs
a float `weight` (for a quantized base, dequantize first).

Not for choosing what to train beyond the adapters, or for the training loop itself.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from scratchlm.errors import UserError
from scratchlm.files import atomic_write, atomic_write_json, read_json

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        if self.rank < 0:
            raise UserError(f"lora.rank must be >= 0 (0 means full fine-tuning), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        self.target_modules = list(self.target_modules)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """A frozen projection plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.scale = alpha / rank
        # Adapters live in the base's float dtype and device (fp32 over a quantized base).
        dtype, device = _float_dtype_and_device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        # Same init as a fresh nn.Linear for A; B = 0 makes the update zero at init.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        for p in self.base.parameters():
            p.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._base_weight().add_(self.delta_weight().to(self._base_weight().dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._base_weight().sub_(self.delta_weight().to(self._base_weight().dtype))
            self.merged = False

    def _base_weight(self) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        # A quantized base exposes `weight` as a dequantized copy: adding to it would be lost.
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
            raise UserError("cannot merge LoRA into a quantized base; dequantize it first")
        return weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def _float_dtype_and_device(module: nn.Module) -> tuple[torch.dtype, torch.device | None]:
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else None
    weight = module._parameters.get("weight")
    if weight is not None and weight.is_floating_point():
        return weight.dtype, device
    return torch.float32, device


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the targeted projections in place and freeze all other parameters.

    Returns the names of the wrapped modules. With `config.rank == 0` nothing changes (full
    fine-tuning) and an empty list is returned.
    """
    if not config.enabled:
        return []
    targets = _find_targets(model, config.target_modules)
    if not targets:
        raise UserError(
            "lora.target_modules matched no module: " + ", ".join(config.target_modules)
            + f" (known projection names: {', '.join(DEFAULT_TARGETS)})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent, attr = _parent_of(model, name)
        base = getattr(parent, attr)
        setattr(parent, attr, LoRALinear(base, config.rank, config.alpha, config.dropout))
    return targets


def _find_targets(model: nn.Module, target_modules) -> list[str]:
    wanted = set(target_modules)
    wrapped = [name + "." for name, _ in lora_modules(model)]
    names = []
    for name, module in model.named_modules():
        # Already wrapped modules (and the base inside them) are not wrapped twice.
        if isinstance(module, LoRALinear) or any(name.startswith(w) for w in wrapped):
            continue
        if name.rsplit(".", 1)[-1] in wanted and hasattr(module, "in_features"):
            names.append(name)
    return names


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    parent_name, attr = name.rsplit(".", 1)
    return model.get_submodule(parent_name), attr


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def merge_lora(model: nn.Module) -> None:
    for _, module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, module in lora_modules(model):
        module.unmerge()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter switched off inside the block."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, keyed `<module>.lora_A` / `<module>.lora_B`."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{name}.lora_A"] = module.lora_A.detach().clone()
        out[f"{name}.lora_B"] = module.lora_B.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "adapters") -> None:
    modules = dict(lora_modules(model))
    expected = {f"{n}.lora_{ab}" for n in modules for ab in "AB"}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise UserError(f"{where}: adapter tensors do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for key, value in tensors.items():
            name, part = key.rsplit(".", 1)
            target = getattr(modules[name], part)
            if target.shape != value.shape:
                raise UserError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (keys as before `apply_lora`), adapters folded in.

    The model itself is left unchanged: weights are merged into copies.
    """
    state = model.state_dict()
    modules = dict(lora_modules(model))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = _lora_owner(key, modules)
        if owner is None:
            out[key] = value
            continue
        name, rest = owner
        if rest.startswith("lora_"):
            continue
        plain_key = f"{name}.{rest[len('base.'):]}"
        module = modules[name]
        if rest == "base.weight" and not module.merged and not module.disabled:
            value = value + module.delta_weight().detach().to(value.dtype)
        out[plain_key] = value.detach().clone() if rest == "base.weight" else value
    return out


def _lora_owner(key: str, modules: dict[str, LoRALinear]) -> tuple[str, str] | None:
    # Longest module-name prefix of the key that is a LoRA module.
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in modules:
            return name, ".".join(parts[i:])
    return None


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapters(directory: str | Path, model: nn.Module, config: LoRAConfig) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `directory`."""
    from safetensors.torch import save

    directory = Path(directory)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda f: f.write(save(tensors)))
    meta = config.to_dict()
    meta["modules"] = [name for name, _ in lora_modules(model)]
    atomic_write_json(directory / ADAPTER_CONFIG, meta)


def load_adapters(directory: str | Path, model: nn.Module) -> LoRAConfig:
    """Apply LoRA as saved in `directory` to `model` and load the adapter weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_json(directory / ADAPTER_CONFIG, "adapter config")
    try:
        config = LoRAConfig(
            rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=float(meta.get("dropout", 0.0)),
            target_modules=list(meta["target_modules"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory / ADAPTER_CONFIG}: bad or missing field ({e})") from None
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"adapter weights not found: {weights_path}")
    if not has_lora(model):
        apply_lora(model, config)
    load_lora_state_dict(model, load_file(str(weights_path)), where=str(weights_path))
    return config
