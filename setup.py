"""Build hooks: scratchlm's optional C hot loops, and the `.pth` line that lets lm_eval find us.

Everything else about the package is declared in pyproject.toml; setuptools' build backend
runs this file to
- compile `scratchlm.tokenizer._fastbpe` and `scratchlm.data._fastfilters` (plain CPython C API,
  no other dependency). If the compiler is missing or fails, the build goes on without them and
  the pure-Python reference implementations (same results) are used;
- put `scratchlm_lm_eval.pth` at the top of site-packages, so that `lm_eval --model scratchlm`
  works (see src/scratchlm/lm_eval_plugin.py: it only installs an import hook).
Not for metadata or dependencies.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

LM_EVAL_PTH_NAME = "scratchlm_lm_eval.pth"
# site.py executes .pth lines that start with "import"; this one only installs an import hook.
LM_EVAL_PTH_LINE = "import scratchlm.lm_eval_plugin; scratchlm.lm_eval_plugin.install()\n"


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


class BuildPyWithPth(build_py):
    """build_py that also writes the lm_eval `.pth` file next to the packages.

    A wheel's top level lands in site-packages. An editable install (PEP 660) does not copy
    build_lib into its wheel, so there the file goes straight to the wheel's install directory.
    """

    def run(self):
        super().run()
        target_dir = self.build_lib
        if getattr(self, "editable_mode", False):
            target_dir = self.get_finalized_command("install").install_lib
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, LM_EVAL_PTH_NAME), "w", encoding="utf-8") as f:
            f.write(LM_EVAL_PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, LM_EVAL_PTH_NAME)]


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
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithPth},
)
