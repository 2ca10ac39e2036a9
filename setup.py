"""Build hook for the one compiled part of scratchlm: the optional BPE hot loops in C.

Everything else about the package is declared in pyproject.toml; setuptools' build backend
runs this file to compile `scratchlm.tokenizer._fastbpe` (src/scratchlm/tokenizer/_fastbpe.c,
plain CPython C API, no other dependency). If the compiler is missing or fails, the build goes
on without it and the tokenizer uses its pure-Python reference implementation (same results).
Not for metadata or dependencies.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the extension if possible; warn instead of failing (the Python path still works)."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler problem means "no extension"
            print(f"warning: scratchlm C extension not built ({e}); using pure Python")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({e}); using pure Python")


setup(
    ext_modules=[
        Extension(
            "scratchlm.tokenizer._fastbpe",
            sources=["src/scratchlm/tokenizer/_fastbpe.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wall"],
            optional=True,
        ),
        Extension(  # the prose quality-rule statistics (data pipeline); optional the same way
            "scratchlm.data._fastfilters",
            sources=["src/scratchlm/data/_fastfilters.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wall"],
            optional=True,
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
