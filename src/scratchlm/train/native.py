"""C kernels for the hot parts of a bf16 training step on a CPU, as torch functions.

`_native_train.c` holds the loops that torch runs slowly at a small model's shapes (see that
file): tanh-GELU forward/backward, the causal softmax of attention forward/backward, the
cross-entropy of a chunk of logits (loss per row and the softmax - one-hot gradient, in place),
the whole causal attention forward/backward with AVX-512 BF16 dot products (it skips the masked
half of the scores, which batched GEMMs compute), AdamW's update and a bf16-into-fp32 add. It is
compiled on first use by `scratchlm.native` into a per-user cache keyed by the source, the flags
and the CPU, and loaded with ctypes (no Python or torch headers). `library()` is None where
there is no compiler, the build fails, or `SCRATCHLM_NATIVE=0`; callers then keep torch's ops
(and the attention is skipped where the compiler did not target AVX-512 BF16). Each call is
split by rows (or heads) across `torch.get_num_threads()` threads (ctypes releases the GIL), and
every row is computed the same way whatever the split, so results do not depend on the thread
count.

Public: `library()`, `gelu_tanh(x)`, `causal_softmax(scores, scale)` and `causal_attention(q, k,
v)` (autograd functions for bf16 CPU tensors; `causal_attention_applies(q, k)` says where the
last one can run), `cross_entropy_rows_(logits, targets)`, `add_bf16_to_f32_(dst, src)` (the
fused loss's accumulation of weight gradients), and `adamw_step_(...)`, AdamW's update
of one fp32 parameter in one pass (used by `scratchlm.train.optim`). Not for fp32/fp16 tensors, GPUs or
inference (the model's own torch path is what inference and exports are tested against).
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from scratchlm.native import load_library

SOURCE = Path(__file__).with_name("_native_train.c")
# -ffast-math lets gcc vectorise the kernels' sums and maxima (scratchlm.native keeps it out of
# the link step, where it would turn on flush-to-zero for the whole process).
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-std=gnu11"]
VERSION = 5  # NATIVE_TRAIN_VERSION in _native_train.c

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "native_train_version": ([], ctypes.c_int),
    "gelu_tanh_fwd_bf16": ([_P, _P, _I, _I], None),
    "gelu_tanh_bwd_bf16": ([_P, _P, _P, _I, _I], None),
    "causal_softmax_fwd_bf16": ([_P, _P, _I, _F, _I, _I, _P], None),
    "causal_softmax_bwd_bf16": ([_P, _P, _P, _I, _F, _I, _I], None),
    "cross_entropy_rows_bf16": ([_P, _P, _P, _I, _I, _I, _P], None),
    "adamw_f32": ([_P, _P, _P, _P, _I, _I, _F, _F, _F, _F, _F, _F], None),
    "add_bf16_to_f32": ([_P, _P, _I, _I], None),
    "causal_attention_available": ([], ctypes.c_int),
    "causal_attention_fwd_bf16": ([_P] * 5 + [_I] * 4 + [_I] * 6 + [_F, _I, _I], None),
    "causal_attention_bwd_bf16": ([_P] * 8 + [_I] * 4 + [_I] * 9 + [_F, _I, _I], None),
}

_LIBRARY: list = []  # [] = not tried yet, [None] = unavailable, [lib] = loaded
_POOL: list = []  # the worker threads, made on the first call that splits work


def library():
    """The loaded C library, or None where it cannot be built (callers then use torch's ops)."""
    if not _LIBRARY:
        _LIBRARY.append(_load())
    return _LIBRARY[0]


def _load():
    return load_library(SOURCE, compile_flags=COMPILE_FLAGS, signatures=_SIGNATURES,
                        version_function="native_train_version", version=VERSION,
                        purpose="native training kernels")


# ---- splitting a call across threads -------------------------------------------------------

# Below this many elements a second thread costs more than it saves.
_MIN_SPLIT_ELEMENTS = 1 << 16


def _split_rows(rows: int, row_elements: int) -> list[tuple[int, int]]:
    parts = max(1, min(torch.get_num_threads(), rows, (rows * row_elements) // _MIN_SPLIT_ELEMENTS))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_split(call, ranges: list[tuple[int, int]]) -> None:
    """call(i, start, stop) for each range: the first on this thread, the rest on workers."""
    if len(ranges) == 1:
        call(0, *ranges[0])
        return
    if not _POOL or _POOL[0]._max_workers < len(ranges) - 1:
        _POOL[:] = [ThreadPoolExecutor(max_workers=len(ranges) - 1, thread_name_prefix="scratchlm-native")]
    futures = [_POOL[0].submit(call, i, start, stop) for i, (start, stop) in enumerate(ranges) if i]
    call(0, *ranges[0])
    for f in futures:
        f.result()


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"{name}: the native kernels take contiguous bf16 CPU tensors, "
                         f"got {x.dtype} on {x.device} (contiguous={x.is_contiguous()})")


# ---- GELU (tanh) ---------------------------------------------------------------------------


def _gelu_forward(x: torch.Tensor) -> torch.Tensor:
    lib, y = library(), torch.empty_like(x)
    n = x.numel()
    _run_split(lambda i, a, b: lib.gelu_tanh_fwd_bf16(x.data_ptr(), y.data_ptr(), a, b), _split_rows(n, 1))
    return y


def _gelu_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lib, dx = library(), torch.empty_like(x)
    _run_split(lambda i, a, b: lib.gelu_tanh_bwd_bf16(g.data_ptr(), x.data_ptr(), dx.data_ptr(), a, b),
               _split_rows(x.numel(), 1))
    return dx


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        _check(x, "gelu_tanh")
        ctx.save_for_backward(x)
        return _gelu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _gelu_backward(grad.to(torch.bfloat16).contiguous(), x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation of a bf16 CPU tensor (= F.gelu(x, approximate="tanh")
    up to one bf16 rounding), about 3x faster than torch's forward + backward here."""
    return _GeluTanh.apply(x)


# ---- causal softmax ------------------------------------------------------------------------


class _CausalSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale):
        scores = scores.contiguous()
        _check(scores, "causal_softmax")
        t = scores.shape[-1]
        rows = scores.numel() // t
        lib, probs = library(), torch.empty_like(scores)
        ranges = _split_rows(rows, t)
        scratch = torch.empty(len(ranges), t, dtype=torch.float32)
        _run_split(lambda i, a, b: lib.causal_softmax_fwd_bf16(
            scores.data_ptr(), probs.data_ptr(), t, scale, a, b, scratch[i].data_ptr()), ranges)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        t = probs.shape[-1]
        lib, ds = library(), torch.empty_like(probs)
        _run_split(lambda i, a, b: lib.causal_softmax_bwd_bf16(
            grad.data_ptr(), probs.data_ptr(), ds.data_ptr(), t, ctx.scale, a, b),
            _split_rows(probs.numel() // t, t))
        return ds, None


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores + causal mask) over the last dim of bf16 [..., T, T] scores whose
    rows are queries 0..T-1 (masked entries are exactly 0; their gradient is 0)."""
    if scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"causal_softmax needs square [..., T, T] scores, got {tuple(scores.shape)}")
    return _CausalSoftmax.apply(scores, float(scale))


# ---- causal attention ----------------------------------------------------------------------


def causal_attention_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True where `causal_attention` can take these [B, H, T, D] queries and [B, Hkv, T, D] keys:
    bf16 on a CPU whose compiler had AVX-512 BF16, T == S, D a multiple of 16."""
    lib = library()
    return (lib is not None and bool(lib.causal_attention_available()) and q.dtype == torch.bfloat16
            and q.device.type == "cpu" and q.shape[-1] % 16 == 0 and q.shape[-2] == k.shape[-2]
            and q.shape[1] % k.shape[1] == 0)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = (_rows_contiguous(x.to(torch.bfloat16)) for x in (q, k, v))
        if k.stride() != v.stride():
            k, v = k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        hkv = k.shape[1]
        padded = (T + 15) // 16 * 16
        out = torch.empty(B, T, H, D, dtype=torch.bfloat16)
        probs = torch.empty(B * H, T, padded, dtype=torch.bfloat16)
        lib = library()
        args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), probs.data_ptr(), H, hkv, T, D,
                *q.stride()[:3], *k.stride()[:3], scale)
        _run_split(lambda i, a, b: lib.causal_attention_fwd_bf16(*args, a, b), _split_rows(B * H, T * T * D))
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved_tensors
        grad = _rows_contiguous(grad.to(torch.bfloat16))
        B, H, T, D = q.shape
        hkv = k.shape[1]
        dq = torch.empty(B, T, H, D, dtype=torch.bfloat16)
        dk, dv = (torch.empty(B, T, hkv, D, dtype=torch.bfloat16) for _ in range(2))
        lib = library()
        args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), probs.data_ptr(), grad.data_ptr(), dq.data_ptr(),
                dk.data_ptr(), dv.data_ptr(), H, hkv, T, D, *q.stride()[:3], *k.stride()[:3],
                *grad.stride()[:3], ctx.scale)
        _run_split(lambda i, a, b: lib.causal_attention_bwd_bf16(*args, a, b),
                   _split_rows(B * hkv, (H // hkv) * T * T * D))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal) v for bf16 q [B, H, T, D] and k, v [B, Hkv, T, D]
    (query head h uses kv head h // (H / Hkv)); the result is a [B, H, T, D] view of a
    contiguous [B, T, H, D] tensor. Check `causal_attention_applies` first."""
    return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5)


causal_attention.applies = causal_attention_applies


# ---- cross-entropy rows --------------------------------------------------------------------


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row (fp32 [rows]); `logits` ([rows, V] bf16) is
    overwritten with softmax - onehot(target) in bf16, the gradient of the summed loss.
    Targets must be in [0, V) or -1 (an ignored row: loss 0, gradient row 0)."""
    _check(logits, "cross_entropy_rows_")
    rows, vocab = logits.shape
    targets = targets.to(torch.int64).contiguous()
    if targets.shape != (rows,):
        raise ValueError(f"targets of shape {tuple(targets.shape)} for {rows} rows of logits")
    if rows and (int(targets.max()) >= vocab or int(targets.min()) < -1):
        raise IndexError(f"target out of range for {vocab} classes")
    nll = torch.empty(rows, dtype=torch.float32)
    lib = library()
    ranges = _split_rows(rows, vocab)
    scratch = torch.empty(len(ranges), vocab, dtype=torch.float32)
    _run_split(lambda i, a, b: lib.cross_entropy_rows_bf16(
        logits.data_ptr(), targets.data_ptr(), nll.data_ptr(), vocab, a, b, scratch[i].data_ptr()), ranges)
    return nll


# ---- accumulating into fp32 ---------------------------------------------------------------


def add_bf16_to_f32_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst += src for a contiguous fp32 `dst` and bf16 `src` of the same shape, in one pass."""
    _check(src, "add_bf16_to_f32_")
    if dst.dtype != torch.float32 or not dst.is_contiguous() or dst.shape != src.shape:
        raise ValueError(f"add_bf16_to_f32_: dst must be contiguous fp32 of shape {tuple(src.shape)}")
    lib = library()
    _run_split(lambda i, a, b: lib.add_bf16_to_f32(src.data_ptr(), dst.data_ptr(), a, b),
               _split_rows(src.numel(), 1))
    return dst


# ---- AdamW ---------------------------------------------------------------------------------


def adamw_applies(tensors) -> bool:
    """True when the one-pass AdamW kernel can update these (fp32, contiguous, CPU) tensors.

    Plain tensors only: a tensor subclass such as FSDP2's sharded DTensor has no flat local
    storage behind `data_ptr()`, so it stays with torch's update."""
    return library() is not None and all(
        type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32
        and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def adamw_step_(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """torch.optim.AdamW's update of one parameter and its moments, in place, in one pass."""
    lib = library()
    bias_correction1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    decay, step_size = 1.0 - lr * weight_decay, lr / bias_correction1
    ptrs = (param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr())
    _run_split(lambda i, a, b: lib.adamw_f32(*ptrs, a, b, beta1, beta2, decay, step_size, eps, bc2_sqrt),
               _split_rows(param.numel(), 1))
