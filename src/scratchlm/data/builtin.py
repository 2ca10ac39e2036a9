"""Embedded corpora that need no network: `builtin:NAME` sources.

`builtin:python-stdlib` is the source code of the running interpreter's standard library, one
document per `.py` file, with test suites and vendored third-party copies left out: real text
present on every machine with Python. Not for downloading anything.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

# Directory names whose contents are tests, caches or someone else's vendored code.
_EXCLUDED_DIRS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "_vendor", "__pycache__",
    "_bundled", "ensurepip", "lib2to3", "turtledemo", "idlelib",
}


def python_stdlib_files() -> list[Path]:
    """The standard library's own `.py` files, sorted so every machine reads them in one order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


BUILTIN_SOURCES: dict[str, Callable[[], list[Path]]] = {
    "python-stdlib": python_stdlib_files,
}


def builtin_files(name: str) -> list[Path]:
    from scratchlm.errors import UserError

    if name not in BUILTIN_SOURCES:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_SOURCES)
        raise UserError(f"unknown builtin corpus 'builtin:{name}' (known: {known})")
    return BUILTIN_SOURCES[name]()


def iter_builtin_names() -> Iterator[str]:
    yield from BUILTIN_SOURCES
