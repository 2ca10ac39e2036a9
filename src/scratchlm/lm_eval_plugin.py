"""Makes lm-evaluation-harness's own command line know the model type `scratchlm`.

lm_eval (0.4) finds model types only in its registry, which it fills from its own
`lm_eval.models` module; it has no plugin discovery for other packages. So scratchlm installs a
`.pth` file (see setup.py) whose one line calls `install()` at interpreter start. `install()`
adds an import hook and nothing else: no lm_eval, no torch, no model code is imported. When some
program imports `lm_eval.models`, the hook lets it load, then registers "scratchlm" in lm_eval's
model registry as a lazy target (`scratchlm.eval.lm_eval_adapter:ScratchLM`), imported only when
someone asks for that model. Then `lm_eval --model scratchlm --model_args path=RUN ...` works.

Not for the adapter itself (`scratchlm.eval.lm_eval_adapter`) or for anything without lm_eval.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MODEL_NAME = "scratchlm"
ADAPTER_TARGET = "scratchlm.eval.lm_eval_adapter:ScratchLM"
WATCHED_MODULE = "lm_eval.models"


def register_with_lm_eval() -> None:
    """Add the lazy "scratchlm" entry to lm_eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER_TARGET)


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs the real loader of `lm_eval.models`, then registers scratchlm."""

    def __init__(self, real_loader):
        self.real_loader = real_loader

    def create_module(self, spec):
        return self.real_loader.create_module(spec)

    def exec_module(self, module):
        self.real_loader.exec_module(module)
        try:
            register_with_lm_eval()
        except Exception as e:  # noqa: BLE001 - a registry change upstream must not break lm_eval
            print(f"scratchlm: could not register with lm_eval ({e})", file=sys.stderr)


class _WatchLmEvalModels(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` with the normal machinery and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Install the hook once; if lm_eval's registry is already loaded, register right away."""
    if any(isinstance(finder, _WatchLmEvalModels) for finder in sys.meta_path):
        return
    if WATCHED_MODULE in sys.modules:
        register_with_lm_eval()
        return
    sys.meta_path.insert(0, _WatchLmEvalModels())
