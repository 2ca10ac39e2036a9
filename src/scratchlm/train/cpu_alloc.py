"""Keep freed tensor memory in the process on CPU, so a training step does not page-fault.

glibc's malloc hands every block above its mmap threshold (128 KB at first) to the kernel and
gives it back on free, and trims the heap top the same way; a training step allocates and frees
tens of activation tensors of megabytes each, so each step re-faults (and the kernel re-zeroes)
every page of them. Measured on the 2-core Zen 4 box: 3-10% of a small model's step, and 3-4x on
a chunk of the fused loss. `keep_freed_memory()` raises both thresholds with `mallopt`, so a
step's blocks are reused by the next step. The cost is that the process keeps its peak heap.
Not for GPU memory (the CUDA caching allocator already does this) nor for non-glibc systems
(a no-op there).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MB on 64-bit); blocks beyond it
# are rare in a step and cheap relative to the work done on them.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GB of free heap top kept at most

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if glibc took them."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS, Windows): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    _done = ok
    return ok
