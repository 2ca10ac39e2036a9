"""Loads the decode step's C hot loops (`_native_decode.c`) and calls them on torch tensors.

The C file is compiled on first use by `scratchlm.native` (`cc -O3 -march=native`, under
a second) into a per-user cache directory keyed by the source, the flags and this CPU, and
loaded through ctypes; no Python or torch headers are involved. Where there is no compiler,
the compile fails, or `SCRATCHLM_NATIVE=0` is set, `library()` returns None and decoding uses
torch ops instead (same results up to float rounding order).

The wrappers take fp32, contiguous CPU tensors and check nothing on the hot path: callers
(`scratchlm.infer.fast_decode`) check shapes, dtypes and layouts once when they build their
buffers. Not for anything that needs gradients, another dtype or another device.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from scratchlm.native import load_library

SOURCE = Path(__file__).with_name("_native_decode.c")
COMPILE_FLAGS = ["-O3", "-march=native", "-std=gnu11"]
VERSION = 4  # the VERSION of _native_decode.c this module's bindings expect

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "native_version": ([], ctypes.c_int),
    "advise_huge_pages": ([_P, _I], ctypes.c_int),
    "panel_width": ([], ctypes.c_int),
    "linear_packed_f32": ([_P, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int], None),
    "linear_packed_bf16": ([_P, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int], None),
    "rmsnorm_f32": ([_P, _I, _I, _P, ctypes.c_float, _P], None),
    "qkv_to_cache_f32": ([_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I], None),
    "embed_rows_f32": ([_P, _I, _P, _I, _I, _P], ctypes.c_int64),
    "attend_decode_f32": ([_P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _I, ctypes.c_float, _P, _P], None),
    "silu_mul_f32": ([_P, _I, _I, _P], None),
}

_LIBRARY: list = []  # [] = not tried yet, [None] = unavailable, [lib] = loaded


def library():
    """The loaded C library, or None where it cannot be built (then callers use torch)."""
    if not _LIBRARY:
        _LIBRARY.append(_load())
    return _LIBRARY[0]


def _load():
    return load_library(SOURCE, compile_flags=COMPILE_FLAGS, signatures=_SIGNATURES,
                        version_function="native_version", version=VERSION,
                        purpose="native decode kernels")


# ---- packing and calls ----------------------------------------------------------------------


def panel_width() -> int:
    return library().panel_width()


def packed_numel(n: int, k: int) -> int:
    """How many floats `pack_weight` needs for an `nn.Linear` weight [n, k]."""
    panel = panel_width()
    return -(-n // panel) * panel * k


def pack_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """An `nn.Linear` weight [N, K] as the kernels read it: panels of `panel_width()` output
    columns, each [K, panel] contiguous, zero-padded past N. A copy (fp32, or into `out`, a flat
    fp32 or bf16 tensor of `packed_numel` elements); the source is untouched."""
    panel = panel_width()
    n, k = weight.shape
    padded = torch.zeros(-(-n // panel) * panel, k, dtype=torch.float32)
    padded[:n] = weight.detach().float()
    source = padded.view(-1, panel, k).transpose(1, 2)
    if out is None:
        return source.contiguous()
    packed = out.view(-1, k, panel)
    packed.copy_(source)
    return packed


def huge_page_buffer(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat tensor whose memory the kernel is asked to back with 2 MiB pages (where the OS
    offers it: Linux transparent huge pages in "madvise" or "always" mode). Fill it after this
    call: only pages not yet touched can become huge pages."""
    buffer = torch.empty(numel, dtype=dtype)
    library().advise_huge_pages(buffer.data_ptr(), numel * buffer.element_size())
    return buffer


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
