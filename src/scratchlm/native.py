"""Builds and loads scratchlm's optional C kernels: compiled on first use, loaded with ctypes.

Two hot-loop files use this: `infer/_native_decode.c` (the decode step) and
`train/_native_train.c` (the elementwise parts of a bf16 training step). Each is plain C with no
Python or torch headers, compiled with the system C compiler (`$CC`, default `cc`) and
`-march=native`, into a per-user cache (`$XDG_CACHE_HOME/scratchlm/native`, else
`~/.cache/scratchlm/native`) under a name keyed by the source, the flags and this CPU, so a
changed file, flag or machine gets its own build and an unchanged one is built once.

`load_library` returns None, after one warning, where there is no compiler or the build fails,
and without a warning where `SCRATCHLM_NATIVE=0` is set or the platform is not Linux: callers then
use their torch code path, which is the reference their kernels are tested against.
Not for the CPython extensions built by setup.py (the tokenizer's and the data filters').
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

DISABLE_ENV = "SCRATCHLM_NATIVE"
BUILD_TIMEOUT_S = 120


def native_enabled() -> bool:
    """False where the user switched the kernels off (`SCRATCHLM_NATIVE=0`) or off Linux."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and sys.platform == "linux"


def load_library(
    source: Path,
    *,
    compile_flags: Sequence[str],
    signatures: dict[str, tuple[list, object]],
    version_function: str,
    version: int,
    purpose: str,
    link_flags: Sequence[str] = (),
):
    """Build (if needed) and load `source`; bind `signatures` ({name: (argtypes, restype)}).

    Returns None where the kernels cannot be used, including when the library's
    `version_function()` does not return `version` (bindings and C file out of step)."""
    if not native_enabled():
        return None
    try:
        lib = ctypes.CDLL(str(compiled_library(source, compile_flags, link_flags)))
        for name, (args, result) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"scratchlm: {purpose} unavailable ({e}); using torch ops", RuntimeWarning, stacklevel=3)
        return None
    return lib if getattr(lib, version_function)() == version else None


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "scratchlm" / "native"


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (a shared home directory may be
    mounted on different machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def compiled_library(source: Path, compile_flags: Sequence[str], link_flags: Sequence[str]) -> Path:
    """The shared library built from `source` with these flags on this CPU; built unless it exists.

    Compiling and linking are separate steps so that compile-only flags (e.g. -ffast-math, which
    at link time would pull in crtfastmath.o and set flush-to-zero for the whole process) stay
    out of the link."""
    key_material = source.read_bytes() + " ".join([*compile_flags, "|", *link_flags]).encode() + cpu_signature().encode()
    target = cache_dir() / f"{source.stem}-{hashlib.sha256(key_material).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = os.path.join(tmp, "kernels.o"), os.path.join(tmp, "kernels.so")
        subprocess.run([compiler, *compile_flags, "-fPIC", "-c", "-o", obj, str(source)], check=True,
                       capture_output=True, timeout=BUILD_TIMEOUT_S)
        subprocess.run([compiler, *link_flags, "-shared", "-o", lib, obj, "-lm"], check=True,
                       capture_output=True, timeout=BUILD_TIMEOUT_S)
        os.replace(lib, target)  # atomic: a concurrent process never loads a half-written file
    return target
