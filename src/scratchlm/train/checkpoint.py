"""Training checkpoints: save, verify, find the latest valid one, keep the last K.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding
- `model.safetensors`: the model's weights (a tied weight stored once),
- `optimizer.safetensors`: every tensor of the optimizer state,
- `state.json`, written last: step, tokens seen, RNG states, the task's (loader's) state, the
  config, the optimizer's non-tensor state, and the sha256 of each tensor file.
It is built under a temporary name and renamed into place, so a crash mid-write leaves no
half checkpoint under a real name; a truncated or corrupted one fails its checksums and is
skipped in favour of the previous one. Also holds the weight helpers `runs.py` shares.

Not for the run dir's final artifacts (`scratchlm.runs`), nor for sharded (FSDP) checkpoints:
those subclass `CheckpointManager` and override `write_tensors` / `read_tensors`.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.files import atomic_write_json, sha256_file

STEP_DIR = re.compile(r"^step_(\d{8,})$")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Weights


def weights_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with each shared (tied) tensor once, under its first name."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous()
    return out


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load weights saved by `weights_for_saving`; a missing key must be a tied alias of a present one."""
    from scratchlm.errors import UserError

    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise UserError(f"{source}: unexpected tensors {', '.join(sorted(unexpected)[:5])}")
    if missing:
        aliases = _tied_aliases(model)
        really_missing = [k for k in missing if aliases.get(k) not in tensors]
        if really_missing:
            raise UserError(f"{source}: missing tensors {', '.join(sorted(really_missing)[:5])}")


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """name -> first name sharing its storage, for every later name of a shared tensor."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


# ---------------------------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, the rest to JSON


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        meta_state[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                meta_state[str(index)][key] = value
    return tensors, {"state": meta_state, "param_groups": state_dict["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in meta["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------
# RNG states (JSON-able)


def capture_rng_state() -> dict[str, Any]:
    import numpy as np

    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "python": _python_rng_to_json(random.getstate()),
        "numpy": _numpy_rng_to_json(np.random.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(_unb64(state["torch"]))
    random.setstate(_python_rng_from_json(state["python"]))
    np.random.set_state(_numpy_rng_from_json(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _numpy_rng_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_rng_from_json(state: list) -> tuple:
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)


# ---------------------------------------------------------------------------------------------
# The manager


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors for the model and optimizer, and everything else."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict  # a full optimizer state_dict, ready for `load_state_dict`
    state: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """Saves checkpoints under `directory`, keeps the last `keep`, loads the latest valid one."""

    MODEL_FILE = "model.safetensors"
    OPTIMIZER_FILE = "optimizer.safetensors"
    STATE_FILE = "state.json"

    def __init__(self, directory: str | os.PathLike, keep: int = 3, is_main: bool = True):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.is_main = is_main  # only the main process writes (data-parallel replicas are equal)

    # -- saving --------------------------------------------------------------------------------

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path | None:
        """Write a checkpoint for `step` atomically; return its path (None off the main process)."""
        if not self.is_main:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        opt_tensors, opt_meta = split_optimizer_state(optimizer.state_dict())
        files = self.write_tensors(tmp, weights_for_saving(model), opt_tensors)
        full_state = {
            "format_version": FORMAT_VERSION,
            **state,
            "step": step,
            "optimizer": opt_meta,
            "files": files,
        }
        atomic_write_json(tmp / self.STATE_FILE, full_state)
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            trash = self.directory / f".{final.name}.old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        self.prune()
        return final

    def write_tensors(self, directory: Path, model_tensors: dict, optimizer_tensors: dict) -> dict[str, str]:
        """Write the tensor files; return {file name: sha256}. Override for sharded formats."""
        files = {}
        for name, tensors in ((self.MODEL_FILE, model_tensors), (self.OPTIMIZER_FILE, optimizer_tensors)):
            path = directory / name
            save_file(tensors, str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = sha256_file(path)
        return files

    def prune(self) -> None:
        """Keep the newest `keep` checkpoints; remove leftovers of interrupted saves."""
        for leftover in self.directory.glob(".step_*"):
            if leftover.is_dir() and not _owned_by_live_process(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        for old in self.list_steps()[: -self.keep]:
            shutil.rmtree(old[1], ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------

    def list_steps(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint directory, oldest first (valid or not)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint at `path` is complete and its checksums match, else why not."""
        state_path = path / self.STATE_FILE
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "no state.json"
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "state.json is not valid JSON"
        files = state.get("files") if isinstance(state, dict) else None
        if not isinstance(files, dict) or not files:
            return "state.json lists no files"
        for name, digest in files.items():
            file_path = path / name
            if not file_path.is_file():
                return f"{name} is missing"
            if sha256_file(file_path) != digest:
                return f"{name} fails its checksum"
        return None

    def latest_valid(self, warn=None) -> Path | None:
        """The newest checkpoint that verifies; each broken newer one is reported via `warn`."""
        warn = warn or (lambda msg: print(msg, file=sys.stderr))
        for step, path in reversed(self.list_steps()):
            problem = self.verify(path)
            if problem is None:
                return path
            warn(f"scratchlm: skipping checkpoint {path}: {problem}")
        return None

    def load(self, path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        state = json.loads((path / self.STATE_FILE).read_text(encoding="utf-8"))
        model_tensors, optimizer_tensors = self.read_tensors(path, map_location)
        optimizer = join_optimizer_state(optimizer_tensors, state.pop("optimizer"))
        return Checkpoint(path=path, step=int(state["step"]), model=model_tensors,
                          optimizer=optimizer, state=state)

    def read_tensors(self, path: Path, map_location) -> tuple[dict, dict]:
        device = str(map_location)
        try:
            return (load_file(str(path / self.MODEL_FILE), device=device),
                    load_file(str(path / self.OPTIMIZER_FILE), device=device))
        except (SafetensorError, OSError) as e:  # verified moments ago; raced with a deletion?
            from scratchlm.errors import UserError

            raise UserError(f"cannot read checkpoint {path}: {e}") from None

    def load_latest(self, map_location="cpu", warn=None) -> Checkpoint | None:
        path = self.latest_valid(warn=warn)
        return None if path is None else self.load(path, map_location)


def _owned_by_live_process(path: Path) -> bool:
    """A temporary dir is named `...-PID`; keep it while that process may still be writing."""
    m = re.search(r"-(\d+)$", path.name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
