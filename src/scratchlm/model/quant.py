"""Weight-only quantization of a trained model: INT8 per channel, INT4 per group, RTN/GPTQ/AWQ.

What it is for: making a model small. Every `nn.Linear` (and, separately, the token embedding
and the output head) is swapped from outside for a module that stores integer codes plus scales
and dequantizes on the fly in `forward`:

- INT8: symmetric, one scale per output channel: `w = q * scale`, `q` in [-127, 127].
- INT4: asymmetric, one scale and one offset (fp16) per group of `group_size` input columns:
  `w = q * scale + offset`, `q` in [0, 15], two codes packed per byte (low nibble first).
- Round-to-nearest (`method="rtn"`), or GPTQ (`method="gptq"`): columns are quantized one at a
  time and each one's rounding error is pushed onto the columns not yet quantized through the
  inverse Hessian of calibration activations (Frantar et al., 2022), layer after layer, so each
  layer is calibrated on the outputs of the already-quantized layers before it. GPTQ also
  searches each group's clipping range (the [min, max] the 16 levels span; INT8: the row's max)
  for the least error, weighted as GPTQ weighs it. GPTQ and AWQ quantize an untied embedding
  (a lookup, with no inputs to calibrate on) with the least-squares clipping range.
- AWQ (`method="awq"`, Lin et al., 2023): before round-to-nearest, the input channels of the
  projections that read one activation are scaled by `s = mean|x|^alpha` (alpha searched per group
  on calibration activations for the least output error) and the inverse scale is folded into what
  produces that activation (the RMSNorm/LayerNorm weight before q/k/v, gate/up and the head; the
  up projection's rows before a SwiGLU down projection; v's rows before o when every query head
  has its own kv head), so channels with large activations get finer steps at no storage cost.
- Optionally (`tune_steps > 0`, on top of any method): the integer codes stay as they are and
  the per-group scales and offsets are tuned by gradient descent so that the quantized model's
  next-token distribution on the calibration windows matches the float model's (KL divergence).
  Layer-by-layer GPTQ cannot see how errors add up through the network and the softmax; this
  step does, at the cost of a few forward/backward passes.

A quantized run dir stores the codes and scales in `model.safetensors` (names like
`layers.0.attn.q_proj.qweight` / `.scale` / `.offset`) and says which module has which format in
the `quantization` section of `config.json`; `apply_quantization(model, section)` rebuilds the
empty quantized modules so that the state dict loads (runs.load_run calls it).

Not for: activation quantization, training in low precision, or fast integer kernels (the
matmul runs in the activations' float dtype after dequantizing the weight).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.errors import UserError

FORMAT = "scratchlm-quant-v1"
SUPPORTED_BITS = (4, 8)
METHODS = ("rtn", "gptq", "awq")
EMBEDDING_NAME = "tok_embeddings"
HEAD_NAME = "lm_head"


# ---------------------------------------------------------------------------------------------
# Tensor math: codes, scales, packing


@dataclass
class QuantizedWeight:
    """A quantized 2-D weight `[rows, cols]` in storage form.

    `qweight` is int8 `[rows, cols]` (8 bits) or uint8 `[rows, cols / 2]` (4 bits, packed);
    `scale` is `[rows, n_groups]`; `offset` is `[rows, n_groups]` for 4 bits, else None.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    cols: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.offset, self.bits, self.cols, dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 in [0, 15], even last dim) two per byte, even index in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({codes.shape[-1]})")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 `[..., n]` -> uint8 codes `[..., 2n]`."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset) for each row of `w [rows, group]`, rounded to their storage dtype.

    INT8 is symmetric (scale = max|w| / 127, fp32). INT4 is asymmetric over [min, max] with fp16
    scale and offset; the codes are computed from the rounded values so that storing them loses
    nothing further.
    """
    w = w.float()
    if bits == 8:
        scale = w.abs().amax(dim=1) / 127.0
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    if bits == 4:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        offset = lo.half()
        # Round the scale up so that (hi - offset) / scale stays within 15 after fp16 rounding.
        scale = ((hi - offset.float()) / 15.0).half()
        scale = torch.where(scale.float() * 15.0 < hi - offset.float(), _next_up_half(scale), scale)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.float(), offset.float()
    raise ValueError(f"unsupported bits {bits}")


# Fractions of a group's [min, max] range cut off at the bottom and at the top; every pair is tried.
CLIP_FRACTIONS = (0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.2, 0.25)


def search_group_params(
    w: torch.Tensor, bits: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like `group_params`, but with the clipping range that minimises the rounding error.

    For each row of `w [rows, group]`, the range [min, max] is narrowed by every pair of
    `CLIP_FRACTIONS` (INT8: max|w| shrunk by each); the pair whose codes give the least
    `sum(importance * (w - dequant)^2)` wins. Clipping a few outliers buys a finer step for the
    rest, which is usually the better trade. `importance [rows, group]` (default 1) weighs columns.
    """
    w = w.float()
    importance = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    if bits == 8:
        cuts = torch.tensor([(0.0, b) for b in CLIP_FRACTIONS])
        lo = -w.abs().amax(dim=1)
        hi = -lo
    else:
        cuts = torch.tensor([(a, b) for a in CLIP_FRACTIONS for b in CLIP_FRACTIONS])
    span = hi - lo
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_offset = torch.ones_like(lo), None if bits == 8 else torch.zeros_like(lo)
    # candidates in chunks, each scored for all rows at once (memory: about 2^24 floats a chunk)
    per_chunk = max(1, (1 << 24) // max(1, w.numel()))
    for first in range(0, len(cuts), per_chunk):
        chunk = cuts[first : first + per_chunk].to(w.device)
        if bits == 8:
            peak = hi[None, :] * (1 - chunk[:, 1:2])  # [C, rows]
            ranges = torch.stack((-peak, peak), dim=-1)
        else:
            ranges = torch.stack((lo + chunk[:, 0:1] * span, hi - chunk[:, 1:2] * span), dim=-1)
        n = chunk.shape[0]
        scale, offset = group_params(ranges.reshape(-1, 2), bits)
        wide = w.repeat(n, 1)  # [C * rows, group]
        deq = dequantize_codes(quantize_codes(wide, scale, offset, bits), scale, offset)
        err = (importance.repeat(n, 1) * (deq - wide) ** 2).sum(dim=1).reshape(n, -1)
        chunk_err, pick = err.min(dim=0)
        better = chunk_err < best_err
        rows = torch.arange(w.shape[0], device=w.device)
        best_err = torch.where(better, chunk_err, best_err)
        best_scale = torch.where(better, scale.reshape(n, -1)[pick, rows], best_scale)
        if offset is not None:
            best_offset = torch.where(better, offset.reshape(n, -1)[pick, rows], best_offset)
    return best_scale, best_offset


def _next_up_half(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round-to-nearest codes for `w [rows, k]` with per-row `scale`/`offset` `[rows]`."""
    if bits == 8:
        return torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    return torch.clamp(torch.round((w - offset[:, None]) / scale[:, None]), 0, 15)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    w = codes * scale[:, None]
    return w if offset is None else w + offset[:, None]


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of `w [rows, cols]`.

    INT8 is per row (`group_size` must be None); INT4 uses groups of `group_size` columns
    (None = one group per row). `clip_search` picks each group's range by `search_group_params`
    (least squared error) instead of its plain [min, max].
    """
    rows, cols = w.shape
    group = _check_group(bits, group_size, cols, "weight")
    groups = w.float().reshape(rows * (cols // group), group)
    scale, offset = search_group_params(groups, bits) if clip_search else group_params(groups, bits)
    codes = quantize_codes(groups, scale, offset, bits).reshape(rows, cols)
    return _to_storage(codes, scale.reshape(rows, -1), None if offset is None else offset.reshape(rows, -1), bits)


def _to_storage(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> QuantizedWeight:
    cols = codes.shape[1]
    if bits == 8:
        return QuantizedWeight(codes.to(torch.int8), scale.float().contiguous(), None, 8, cols)
    return QuantizedWeight(
        pack_int4(codes.to(torch.uint8)).contiguous(),
        scale.half().contiguous(),
        offset.half().contiguous(),
        4,
        cols,
    )


def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    cols: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Storage form back to a float weight `[rows, cols]` (works on row subsets too)."""
    codes = unpack_int4(qweight) if bits == 4 else qweight
    rows, n_groups = scale.shape[:-1], scale.shape[-1]
    # one fresh float tensor, then scaled (and offset) in place: this runs on every forward
    w = codes.to(dtype).reshape(*rows, n_groups, cols // n_groups)
    w.mul_(scale.to(dtype)[..., None])
    if offset is not None:
        w.add_(offset.to(dtype)[..., None])
    return w.reshape(*rows, cols)


def group_for(cols: int, bits: int, group_size: int | None, name: str) -> int | None:
    """The INT4 group size for a matrix with `cols` inputs: `group_size`, or where that does not
    divide `cols` (SwiGLU hidden sizes are multiples of 32), the first of G/2, G/4, ... that does,
    else the largest even divisor below G."""
    if bits == 8 or group_size is None:
        return None
    if group_size <= 0 or group_size % 2:
        raise UserError(f"--group-size must be a positive even number, got {group_size}")
    g = group_size
    while g % 2 == 0 and g >= 2:
        if cols % g == 0:
            return g
        g //= 2
    for g in range(min(group_size, cols), 1, -1):
        if g % 2 == 0 and cols % g == 0:
            return g
    raise UserError(f"{name}: input size {cols} has no even divisor to use as an INT4 group size")


def _check_group(bits: int, group_size: int | None, cols: int, name: str) -> int:
    if bits not in SUPPORTED_BITS:
        raise UserError(f"unsupported bits {bits} for {name}: use 8 or 4")
    if bits == 8:
        if group_size not in (None, cols):
            raise UserError(f"INT8 is per output channel; --group-size applies to INT4 only ({name})")
        return cols
    group = cols if group_size is None else group_size
    if group <= 0 or group % 2 or cols % group:
        raise UserError(
            f"{name}: input size {cols} is not a multiple of the INT4 group size {group} "
            "(pick a group size that divides it, e.g. 32 or 64)"
        )
    return group


# ---------------------------------------------------------------------------------------------
# Modules swapped in for nn.Linear / nn.Embedding


class _QuantStore(nn.Module):
    """Buffers shared by the quantized modules: codes, scale, offset, in the storage layout."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int | None):
        super().__init__()
        group = _check_group(bits, group_size, cols, type(self).__name__)
        self.bits, self.cols, self.rows = bits, cols, rows
        self.group_size = None if bits == 8 else group
        n_groups = cols // group
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(rows, cols, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(rows, 1, dtype=torch.float32))
            self.register_buffer("offset", None)
        else:
            self.register_buffer("qweight", torch.zeros(rows, cols // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float16))
            self.register_buffer("offset", torch.zeros(rows, n_groups, dtype=torch.float16))

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must move the codes and scales but keep the scales' storage
        # dtype (fp16 INT4 scales would lose precision in bf16); forward casts to the input dtype.
        kept = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        out_dtype = getattr(self, "out_dtype", None)
        if out_dtype is not None:
            self.out_dtype = fn(torch.empty(0, dtype=out_dtype)).dtype
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def set_quantized(self, qw: QuantizedWeight) -> None:
        assert qw.bits == self.bits and qw.qweight.shape == self.qweight.shape, "shape mismatch"
        self.qweight.copy_(qw.qweight)
        self.scale.copy_(qw.scale)
        if qw.offset is not None:
            self.offset.copy_(qw.offset)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.offset, self.bits, self.cols, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads `.weight` (its dtype and device)."""
        return self.dequantized(getattr(self, "out_dtype", None) or torch.float32)

    def spec(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


class QuantLinear(_QuantStore):
    """Weight-only quantized replacement for `nn.Linear` (same call, same output shape)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None):
        super().__init__(out_features, in_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw: QuantizedWeight, group_size: int | None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, qw.bits, group_size)
        q.set_quantized(qw)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data.float())
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantEmbedding(_QuantStore):
    """Quantized replacement for `nn.Embedding`: each row (token) is quantized along the model dim.

    Only the looked-up rows are dequantized, so an embedding lookup stays cheap.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None, dtype=torch.float32):
        super().__init__(num_embeddings, embedding_dim, bits, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # The dtype activations should come out in (the float model's embedding dtype).
        self.out_dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        offset = None if self.offset is None else self.offset[idx]
        return dequantize(self.qweight[idx], self.scale[idx], offset, self.bits, self.cols, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


class TiedQuantHead(nn.Module):
    """Output head sharing a `QuantEmbedding`'s codes (tied embeddings stay tied when quantized).

    The embedding is held outside the module tree so the state dict stores the codes once.
    """

    def __init__(self, embedding: QuantEmbedding, bias: nn.Parameter | None = None):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# Whole-model quantization


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _is_tied(model: nn.Module) -> bool:
    emb = getattr(model, EMBEDDING_NAME, None)
    head = getattr(model, HEAD_NAME, None)
    if emb is None or head is None:
        return False
    ew, hw = getattr(emb, "weight", None), getattr(head, "weight", None)
    return isinstance(ew, torch.Tensor) and isinstance(hw, torch.Tensor) and ew.data_ptr() == hw.data_ptr()


def _block_linears(model: nn.Module) -> list[str]:
    """Names of the projections inside the transformer blocks, in module order."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != HEAD_NAME and not isinstance(m, (QuantLinear, TiedQuantHead))
    ]


def _resolve_bits(value, default: int | None, what: str) -> int | None:
    if value == "same":
        return default
    if value in (None, 0, "none", "float"):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: expected 8, 4 or none, got {value!r}") from None
    if bits not in SUPPORTED_BITS:
        raise UserError(f"{what}: expected 8, 4 or none, got {value!r}")
    return bits


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = 64,
    method: str = "rtn",
    embed_bits: int | str | None = "same",
    head_bits: int | str | None = "same",
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    tune_steps: int = 0,
    tune_lr: float = 1e-2,
) -> dict:
    """Quantize `model` in place and return the `quantization` section for its config.json.

    `bits` applies to the block projections; `embed_bits` / `head_bits` (8, 4, None = keep float,
    "same" = `bits`) to the token embedding and the output head. A tied head follows the
    embedding. `group_size` is used by INT4 only. GPTQ needs `calibration`, token windows
    `[N, T]` (see `sample_calibration_windows`). With GPTQ an untied head is calibrated on the
    final norm's outputs like any projection, a tied embedding/head matrix is quantized by GPTQ as
    the head (the lookup reads the same codes), and an untied embedding (a lookup: no inputs to
    calibrate on) gets the least-squares clipping range. `tune_steps > 0` then tunes the scales
    and offsets against the float model on `calibration` (`tune_scales`).
    """
    if method not in METHODS:
        raise UserError(f"unknown quantization method {method!r}: use one of {', '.join(METHODS)}")
    bits = _resolve_bits(bits, None, "--bits")
    if bits is None:
        raise UserError("--bits: expected 8 or 4")
    embed_bits = _resolve_bits(embed_bits, bits, "--embed-bits")
    head_bits = _resolve_bits(head_bits, bits, "--head-bits")
    if method in ("gptq", "awq") and calibration is None:
        raise UserError(f"{method.upper()} needs calibration data: pass --calibration DATASET_DIR")
    if tune_steps < 0:
        raise UserError(f"--tune-steps must be >= 0, got {tune_steps}")
    if tune_steps and calibration is None:
        raise UserError("tuning the scales needs calibration data: pass --calibration DATASET_DIR")
    reference = copy.deepcopy(model) if tune_steps else None
    tied = _is_tied(model)

    # name -> (bits, group size for that matrix's input size)
    plan: dict[str, tuple[int, int | None]] = {}
    for name in _block_linears(model):
        plan[name] = (bits, group_for(model.get_submodule(name).in_features, bits, group_size, name))
    head = getattr(model, HEAD_NAME, None)
    if head_bits is not None and not tied and isinstance(head, nn.Linear):
        plan[HEAD_NAME] = (head_bits, group_for(head.in_features, head_bits, group_size, HEAD_NAME))

    if method == "gptq":
        _gptq_model(model, plan, calibration, batch_size, progress)
    elif method == "awq":
        _awq_model(model, plan, calibration, batch_size, progress)
    else:
        for name, (b, g) in _progress(list(plan.items()), progress, "quantize (rtn)"):
            linear = model.get_submodule(name)
            qw = quantize_weight(linear.weight.data, b, g)
            _set_module(model, name, QuantLinear.from_linear(linear, qw, g))

    modules = {name: {"bits": b, "group_size": g} for name, (b, g) in plan.items()}
    emb = getattr(model, EMBEDDING_NAME, None)
    if embed_bits is not None and isinstance(emb, nn.Embedding):
        g = group_for(emb.embedding_dim, embed_bits, group_size, EMBEDDING_NAME)
        qw = None
        if method == "gptq" and tied:
            qw = _gptq_tied_head(model, embed_bits, g, calibration, batch_size)
        modules.update(_quantize_embedding(model, embed_bits, g, tied, qw, clip_search=method != "rtn"))
    uses_groups = any(m.get("bits") == 4 for m in modules.values())
    section = {
        "format": FORMAT,
        "method": method,
        "bits": bits,
        "group_size": group_size if uses_groups else None,
        "modules": modules,
    }
    if tune_steps:
        tune_scales(model, reference, calibration, tune_steps, tune_lr, batch_size, progress=progress)
        section["tune_steps"] = tune_steps
    return section


def _quantize_embedding(
    model: nn.Module, bits: int, group_size: int | None, tied: bool, qw: QuantizedWeight | None = None,
    clip_search: bool = False,
) -> dict:
    emb: nn.Embedding = getattr(model, EMBEDDING_NAME)
    if qw is None:
        qw = quantize_weight(emb.weight.data, bits, group_size, clip_search=clip_search)
    qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, bits, group_size, emb.weight.dtype)
    qemb.set_quantized(qw)
    qemb.to(emb.weight.device)
    setattr(model, EMBEDDING_NAME, qemb)
    spec = {EMBEDDING_NAME: qemb.spec()}
    if tied:
        head = getattr(model, HEAD_NAME)
        setattr(model, HEAD_NAME, TiedQuantHead(qemb, getattr(head, "bias", None)))
        spec[HEAD_NAME] = {"tied_to": EMBEDDING_NAME}
    return spec


def apply_quantization(model: nn.Module, section: dict, where: str = "config.json") -> nn.Module:
    """Swap in empty quantized modules as the `quantization` section says, so a saved state loads.

    Called by `runs.load_run` between building the float model and loading `model.safetensors`.
    """
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise UserError(f"{where}: quantization.format must be {FORMAT!r}")
    modules = section.get("modules")
    if not isinstance(modules, dict):
        raise UserError(f"{where}: quantization.modules must be an object")
    for name, spec in modules.items():
        if "tied_to" in spec:
            continue
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{where}: quantization.modules names {name!r}, which the model does not have") from None
        bits, group = spec.get("bits"), spec.get("group_size")
        if isinstance(current, nn.Embedding):
            new = QuantEmbedding(current.num_embeddings, current.embedding_dim, bits, group, current.weight.dtype)
        elif isinstance(current, nn.Linear):
            new = QuantLinear(current.in_features, current.out_features, current.bias is not None, bits, group)
        else:
            raise UserError(f"{where}: quantization.modules[{name!r}] is not a Linear or Embedding")
        _set_module(model, name, new.to(_device_of(current)))
    for name, spec in modules.items():
        if "tied_to" in spec:
            target = model.get_submodule(spec["tied_to"])
            head = model.get_submodule(name)
            _set_module(model, name, TiedQuantHead(target, getattr(head, "bias", None)))
    return model


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (_QuantStore, TiedQuantHead)) for m in model.modules())


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each shared tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# GPTQ


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = True,
) -> QuantizedWeight:
    """GPTQ for one weight `[rows, cols]` given `hessian = sum x x^T` of its inputs `[cols, cols]`.

    Columns are quantized left to right; the error of each is spread over the remaining columns
    through the upper Cholesky factor of the inverse Hessian, so that the layer's output on the
    calibration inputs changes as little as possible. Groups are aligned with the blocks so each
    group's scale is computed from the error-corrected weights it will actually hold; with
    `clip_search`, its clipping range is searched (`search_group_params`) weighting each column by
    1 / [H^-1]_jj, the weight GPTQ's own objective gives that column's rounding error.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    group = _check_group(bits, group_size, cols, "weight")
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    U = _inverse_hessian_factor(H)

    block = group if group >= block_size else (block_size // group) * group
    codes = torch.zeros_like(W)
    scales, offsets = torch.zeros(rows, cols // group), torch.zeros(rows, cols // group)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                if clip_search:
                    importance = U1.diagonal()[i : i + group].pow(-2)[None, :]
                    s, o = search_group_params(W1[:, i : i + group], bits, importance)
                else:
                    s, o = group_params(W1[:, i : i + group], bits)
                scales[:, col // group] = s
                if o is not None:
                    offsets[:, col // group] = o
            w = W1[:, i]
            q = quantize_codes(w[:, None], s, o, bits)[:, 0]
            codes[:, col] = q
            e = (w - dequantize_codes(q[:, None], s, o)[:, 0]) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return _to_storage(codes, scales, offsets if bits == 4 else None, bits)


def _inverse_hessian_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is positive definite."""
    eye = torch.eye(H.shape[0], device=H.device)
    extra = 0.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if info == 0:
            break
        extra = max(extra * 10, 1e-3 * float(torch.diag(H).mean()))
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even after damping")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward once the layer of interest has run."""


def _stop_forward(module, args, output):
    raise _StopForward


def _stages(model, plan) -> list[tuple[nn.Module | None, list[str]]]:
    """The planned linears grouped by block, in order, each with the block a calibration forward
    can stop after; then the rest (the head), which needs the whole forward (stop None)."""
    layers = getattr(model, "layers", None)
    stages: list[tuple[nn.Module | None, list[str]]] = []
    if layers is not None:
        for i, layer in enumerate(layers):
            names = [n for n in plan if n.startswith(f"layers.{i}.")]
            if names:
                stages.append((layer, names))
    rest = [n for n in plan if not any(n in names for _, names in stages)]
    if rest:
        stages.append((None, rest))
    return stages


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """The model in eval mode for the block (calibration passes), then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _gptq_model(model, plan: dict[str, tuple[int, int | None]], calibration, batch_size, progress) -> None:
    """Quantize the planned linears block by block, each calibrated on the quantized prefix."""
    calibration = torch.as_tensor(calibration, dtype=torch.long)
    device = _device_of(model)
    with _eval_mode(model):
        for stop_at, names in _progress(_stages(model, plan), progress, "quantize (gptq)"):
            hessians = _collect_hessians(model, names, stop_at, calibration, batch_size, device)
            for name in names:
                linear = model.get_submodule(name)
                b, g = plan[name]
                qw = gptq_quantize_weight(linear.weight.data, hessians[name], b, g)
                _set_module(model, name, QuantLinear.from_linear(linear, qw, g))


def _gptq_tied_head(model, bits: int, group_size: int | None, calibration, batch_size: int) -> QuantizedWeight:
    """GPTQ for a tied embedding/head matrix, calibrated as the head (on the final norm's outputs).

    The head is where this matrix's rounding error reaches the logits of every position; the
    lookup then reads the same codes, so the model stays tied.
    """
    calibration = torch.as_tensor(calibration, dtype=torch.long)
    with _eval_mode(model):
        hessian = _collect_hessians(model, [HEAD_NAME], None, calibration, batch_size, _device_of(model))[HEAD_NAME]
    return gptq_quantize_weight(getattr(model, HEAD_NAME).weight.data, hessian, bits, group_size)


@torch.no_grad()
def _run_calibration(model, on_input: dict, stop_at, calibration, batch_size, device) -> None:
    """Run the calibration windows through `model`, calling `on_input[name](x)` with the input
    `[positions, in]` (fp32) of each named module; stop each forward after `stop_at` if given."""
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, fn=fn: fn(args[0].detach().float().reshape(-1, args[0].shape[-1]))
        )
        for name, fn in on_input.items()
    ]
    if stop_at is not None:
        handles.append(stop_at.register_forward_hook(_stop_forward))
    try:
        for start in range(0, calibration.shape[0], batch_size):
            try:
                model(calibration[start : start + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


def _collect_hessians(model, names, stop_at, calibration, batch_size, device) -> dict[str, torch.Tensor]:
    hessians: dict[str, torch.Tensor] = {}

    def accumulate(name):
        def add(x):
            h = x.T @ x
            hessians[name] = hessians[name] + h if name in hessians else h

        return add

    _run_calibration(model, {name: accumulate(name) for name in names}, stop_at, calibration, batch_size, device)
    missing = [n for n in names if n not in hessians]
    if missing:
        raise RuntimeError(f"GPTQ: no calibration inputs reached {missing}")
    return hessians


# ---------------------------------------------------------------------------------------------
# AWQ

AWQ_ALPHAS = tuple(i / 20 for i in range(21))
AWQ_SEARCH_ROWS = 4096  # calibration positions each alpha is scored on


def _awq_groups(model, plan) -> list[tuple[str, str, list[str]]]:
    """(producer, how to fold, [projections reading its output]) for every foldable activation.

    "norm": the producer is a norm whose weight (and bias) scale its output channels;
    "rows": the producer is a linear whose output rows feed the projections linearly.
    Only pre-norm blocks and planned (to be quantized) projections take part.
    """
    def has(name):
        try:
            model.get_submodule(name)
            return True
        except AttributeError:
            return False

    groups = []
    layers = getattr(model, "layers", None) or []
    for i, layer in enumerate(layers):
        p = f"layers.{i}."
        if getattr(layer, "pre_norm", True) is False:
            continue
        qkv = [p + f"attn.{n}_proj" for n in "qkv" if p + f"attn.{n}_proj" in plan]
        if qkv and _norm_foldable(model, p + "attn_norm"):
            groups.append((p + "attn_norm", "norm", qkv))
        # o reads softmax(qk) @ v, linear in v's rows, when each query head has its own kv head
        attn = layer.attn
        n_head, n_kv_head = getattr(attn, "n_head", None), getattr(attn, "n_kv_head", None)
        same_heads = n_head is not None and n_head == n_kv_head
        if same_heads and p + "attn.o_proj" in plan and has(p + "attn.v_proj"):
            groups.append((p + "attn.v_proj", "rows", [p + "attn.o_proj"]))
        up = [p + f"mlp.{n}_proj" for n in ("gate", "up") if p + f"mlp.{n}_proj" in plan]
        if up and _norm_foldable(model, p + "mlp_norm"):
            groups.append((p + "mlp_norm", "norm", up))
        swiglu = getattr(layer.mlp, "gate_proj", None) is not None
        if swiglu and p + "mlp.down_proj" in plan:
            groups.append((p + "mlp.up_proj", "rows", [p + "mlp.down_proj"]))
    if HEAD_NAME in plan and _norm_foldable(model, "norm"):
        groups.append(("norm", "norm", [HEAD_NAME]))
    return groups


def _norm_foldable(model, name: str) -> bool:
    try:
        norm = model.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(getattr(norm, "weight", None), torch.Tensor) and not isinstance(norm, nn.Linear)


def awq_search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], specs: list[tuple[int, int | None]]
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale for `weights` (all reading `x [n, cols]`) and its alpha.

    Tries `s = mean|x|^alpha` for each alpha in `AWQ_ALPHAS` (alpha 0 is plain round-to-nearest),
    quantizing `W * s` and scoring `sum ||x (Q(W s) / s - W)^T||^2` over the weights.
    """
    x = x.float()
    magnitude = x.abs().mean(dim=0).clamp_min(1e-8)
    best, best_alpha, best_err = torch.ones_like(magnitude), 0.0, math.inf
    for alpha in AWQ_ALPHAS:
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centred, so the product stays near 1
        err = 0.0
        for w, (bits, group) in zip(weights, specs):
            # scored with the clip search the final quantization uses (on the speedrun model,
            # plain [min, max] ranges here pick worse scales: +1.60% bpb instead of +1.26%)
            deq = quantize_weight(w.float() * scale, bits, group, clip_search=True).dequantize() / scale
            err += float(((x @ (deq - w.float()).T) ** 2).sum())
        if err < best_err:
            best, best_alpha, best_err = scale, alpha, err
    return best, best_alpha


@torch.no_grad()
def _fold_scale(model, producer: str, how: str, consumers: list[str], scale: torch.Tensor) -> None:
    """Multiply the consumers' input columns by `scale` and divide the producer's output by it."""
    for name in consumers:
        linear = model.get_submodule(name)
        linear.weight.mul_(scale.to(linear.weight.dtype)[None, :])
    src = model.get_submodule(producer)
    if how == "norm":
        src.weight.div_(scale.to(src.weight.dtype))
        if getattr(src, "bias", None) is not None:
            src.bias.div_(scale.to(src.bias.dtype))
    else:
        src.weight.div_(scale.to(src.weight.dtype)[:, None])
        if src.bias is not None:
            src.bias.div_(scale.to(src.bias.dtype))


def _awq_model(model, plan: dict[str, tuple[int, int | None]], calibration, batch_size, progress) -> None:
    """Block by block (each on the already-quantized prefix): search and fold AWQ scales, then RTN."""
    groups = _awq_groups(model, plan)
    calibration = torch.as_tensor(calibration, dtype=torch.long)
    device = _device_of(model)
    with _eval_mode(model):
        for stop_at, names in _progress(_stages(model, plan), progress, "quantize (awq)"):
            mine = [g for g in groups if g[2][0] in names]
            inputs = _collect_inputs(model, [g[2][0] for g in mine], stop_at, calibration, batch_size, device)
            for producer, how, consumers in mine:
                x = inputs[consumers[0]]
                x = x[:: max(1, x.shape[0] // AWQ_SEARCH_ROWS)]
                weights = [model.get_submodule(n).weight.data for n in consumers]
                scale, _ = awq_search_scale(x, weights, [plan[n] for n in consumers])
                _fold_scale(model, producer, how, consumers, scale)
            for name in names:
                linear = model.get_submodule(name)
                b, g = plan[name]
                qw = quantize_weight(linear.weight.data, b, g, clip_search=True)
                _set_module(model, name, QuantLinear.from_linear(linear, qw, g))


def _collect_inputs(model, names, stop_at, calibration, batch_size, device) -> dict[str, torch.Tensor]:
    """The inputs `[positions, in]` that reach each named module on the calibration windows."""
    if not names:
        return {}
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    on_input = {name: (lambda x, name=name: chunks[name].append(x.cpu())) for name in names}
    _run_calibration(model, on_input, stop_at, calibration, batch_size, device)
    return {name: torch.cat(c) for name, c in chunks.items() if c}


# ---------------------------------------------------------------------------------------------
# Scale tuning (after any method)


def tune_scales(
    model: nn.Module,
    reference: nn.Module,
    calibration: torch.Tensor,
    steps: int,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Tune a quantized model's scales and offsets (codes fixed) to match `reference` on `calibration`.

    Each step draws `batch_size` windows and lowers the KL divergence from the float model's
    next-token distribution to the quantized one's, with Adam (cosine decay). A group's scale is
    tuned as `scale * exp(a * 16 / 2**bits)` and its offset as `offset + b * scale`, so one rate
    suits groups of any magnitude and either width: a step of `lr` moves every group's largest
    codes by about the same share of a quantization step (INT8's are 16x finer than INT4's).
    The results are rounded to the storage dtypes at the end. Returns the loss of each step.
    """
    calibration = torch.as_tensor(calibration, dtype=torch.long)
    stores = [m for m in model.modules() if isinstance(m, _QuantStore)]
    if not stores:
        return []
    device = _device_of(model)
    frozen = [(p, p.requires_grad) for p in list(model.parameters()) + list(reference.parameters())]
    for p, _ in frozen:
        p.requires_grad_(False)
    start = {m: (m.scale.detach().float(), None if m.offset is None else m.offset.detach().float()) for m in stores}
    log_scale = {m: torch.zeros_like(start[m][0], requires_grad=True) for m in stores}
    shift = {m: torch.zeros_like(start[m][0], requires_grad=True) for m in stores if m.offset is not None}
    optimizer = torch.optim.Adam(list(log_scale.values()) + list(shift.values()), lr=lr)
    # cosine decay to zero: the last steps settle instead of jittering at the full step size
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    was_training, ref_training = model.training, reference.training
    model.eval()
    reference.eval()
    losses = []
    try:
        for _ in _progress(range(steps), progress, "tune scales", unit="step"):
            rows = torch.randint(0, calibration.shape[0], (min(batch_size, calibration.shape[0]),), generator=generator)
            ids = calibration[rows].to(device)
            with torch.no_grad():
                target = F.log_softmax(reference(ids).float(), dim=-1).flatten(0, -2)
            for m in stores:  # the modules read these buffers in forward: point them at the tuned values
                scale0, offset0 = start[m]
                m._buffers["scale"] = scale0 * torch.exp(log_scale[m] * _scale_step(m.bits))
                if offset0 is not None:
                    m._buffers["offset"] = offset0 + shift[m] * scale0
            logp = F.log_softmax(model(ids).float(), dim=-1).flatten(0, -2)
            loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        with torch.no_grad():
            for m in stores:
                scale0, offset0 = start[m]
                dtype = torch.float32 if m.bits == 8 else torch.float16
                m._buffers["scale"] = (scale0 * torch.exp(log_scale[m] * _scale_step(m.bits))).to(dtype).contiguous()
                if offset0 is not None:
                    m._buffers["offset"] = (offset0 + shift[m] * scale0).to(dtype).contiguous()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
        reference.train(ref_training)
    return losses


def _scale_step(bits: int) -> float:
    return 16 / 2**bits


def sample_calibration_windows(dataset_dir, n_windows: int = 128, seq_len: int = 256, seed: int = 0, split: str = "train") -> torch.Tensor:
    """`n_windows` random token windows `[n, seq_len]` from a dataset dir, for GPTQ."""
    from scratchlm.data.loader import TokenLoader

    loader = TokenLoader(dataset_dir, split=split, seq_len=seq_len, batch_size=n_windows, seed=seed)
    inputs, _ = loader.next_batch()[:2]
    return inputs


def _progress(items, enabled: bool, desc: str, unit: str = "layer") -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


# ---------------------------------------------------------------------------------------------
# Run dirs


@dataclass
class QuantizeReport:
    """What `quantize_run` did, with sizes to show the user."""

    out_dir: str
    method: str
    bits: int
    group_size: int | None
    source_file_bytes: int
    file_bytes: int
    source_memory_bytes: int
    memory_bytes: int
    seconds: float

    @property
    def file_ratio(self) -> float:
        return self.source_file_bytes / max(1, self.file_bytes)

    def summary(self) -> str:
        mib = 1 << 20
        return (
            f"quantized {self.method} INT{self.bits}"
            + (f" g{self.group_size}" if self.bits == 4 and self.group_size else "")
            + f" -> {self.out_dir}: model.safetensors {self.source_file_bytes / mib:.2f} MiB -> "
            f"{self.file_bytes / mib:.2f} MiB ({self.file_ratio:.2f}x smaller), weights in memory "
            f"{self.source_memory_bytes / mib:.2f} MiB -> {self.memory_bytes / mib:.2f} MiB, {self.seconds:.1f} s"
        )


def quantize_run(
    run_dir,
    out_dir,
    bits: int = 8,
    group_size: int | None = 64,
    method: str = "rtn",
    calibration_dir=None,
    calibration_windows: int = 128,
    calibration_seq_len: int = 256,
    embed_bits="same",
    head_bits="same",
    seed: int = 0,
    progress: bool = True,
    tune_steps: int = 0,
    tune_lr: float = 1e-2,
) -> QuantizeReport:
    """Quantize the run at `run_dir` into a new run dir `out_dir` (config gains `quantization`).

    GPTQ and `tune_steps > 0` calibrate on `calibration_windows` windows of `calibration_dir`."""
    import shutil
    import time
    from pathlib import Path

    from scratchlm.runs import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, load_run, save_run

    start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise UserError(f"--out must be a new run dir, not the source run {run_dir}")
    run = load_run(run_dir)
    if run.config.get("quantization"):
        raise UserError(f"{run_dir / CONFIG_FILE}: this run is already quantized")
    source_memory = model_nbytes(run.model)
    calibration = None
    if method in ("gptq", "awq") or tune_steps:
        if calibration_dir is None:
            what = f"--method {method}" if method != "rtn" else "--tune-steps"
            raise UserError(f"{what} needs --calibration DATASET_DIR (token windows to calibrate on)")
        seq_len = min(calibration_seq_len, run.model.config.max_seq_len)
        calibration = sample_calibration_windows(calibration_dir, calibration_windows, seq_len, seed)
        if int(calibration.max()) >= run.model.config.vocab_size:
            raise UserError(f"{calibration_dir}: token ids exceed the model's vocab_size; wrong tokenizer?")
    section = quantize_model(run.model, bits, group_size, method, embed_bits, head_bits, calibration,
                             progress=progress, tune_steps=tune_steps, tune_lr=tune_lr)
    config = dict(run.config)
    config["quantization"] = section
    save_run(out_dir, run.model, None, config)
    if (run_dir / TOKENIZER_DIR).is_dir():
        shutil.copytree(run_dir / TOKENIZER_DIR, out_dir / TOKENIZER_DIR, dirs_exist_ok=True)
    return QuantizeReport(
        out_dir=str(out_dir),
        method=method,
        bits=bits,
        group_size=section["group_size"],
        source_file_bytes=(run_dir / WEIGHTS_FILE).stat().st_size,
        file_bytes=(out_dir / WEIGHTS_FILE).stat().st_size,
        source_memory_bytes=source_memory,
        memory_bytes=model_nbytes(run.model),
        seconds=time.perf_counter() - start,
    )
