"""Run directories: the artifact every training stage writes and every later stage reads.

`save_run(run_dir, model, tokenizer, config)` writes `config.json` (the full resolved config, its
"model" section the model's own `ModelConfig`), `model.safetensors` (the state_dict, a tied weight
once) and `tokenizer/`; `load_run(run_dir)` gives them back as a `Run`. Training also writes
`metrics.jsonl`, `checkpoints/` and plots there (see `scratchlm.train`).
Not for training state (optimizer, RNG, loader): that lives in checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.files import atomic_write, atomic_write_json, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Run:
    model: Any  # scratchlm.model.transformer.Transformer, in eval mode
    tokenizer: Any  # whatever `scratchlm.tokenizer.load_tokenizer` returns, or None
    config: dict[str, Any]  # the config.json contents
    path: Path


def resolved_config_dict(config: Any, model: Any = None) -> dict[str, Any]:
    """A config (a `scratchlm.config.Config` or a dict) as plain JSON, with the model's real config."""
    if hasattr(config, "to_dict"):
        d = config.to_dict()
    else:
        d = dict(config or {})
    if model is not None and hasattr(model, "config") and hasattr(model.config, "to_dict"):
        d["model"] = model.config.to_dict()
    return d


def save_weights(path: str | os.PathLike, model: Any, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights to a safetensors file atomically."""
    from safetensors.torch import save

    from scratchlm.train.checkpoint import weights_for_saving

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights_for_saving(model).items()}
    data = save(tensors, metadata={"format": "pt", **(metadata or {})})
    atomic_write(path, lambda f: f.write(data), "wb")


def save_run(run_dir: str | os.PathLike, model: Any, tokenizer: Any, config: Any) -> Path:
    """Write config.json, model.safetensors and tokenizer/ into `run_dir` (each atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / WEIGHTS_FILE, model)
    if tokenizer is not None:
        tokenizer.save(run_dir / TOKENIZER_DIR)
    # config.json last: a run dir with a config.json is a complete one
    atomic_write_json(run_dir / CONFIG_FILE, resolved_config_dict(config, model))
    return run_dir


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> Run:
    """Read a run dir back: the model (weights loaded, eval mode), its tokenizer and config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from scratchlm.model.config import ModelConfig
    from scratchlm.model.transformer import Transformer
    from scratchlm.train.checkpoint import load_weights

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir not found: {run_dir}")
    config = read_json(run_dir / CONFIG_FILE, "run config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{run_dir / CONFIG_FILE}: no \"model\" section")
    model = Transformer(ModelConfig.from_dict(config["model"]))
    if config.get("quantization"):  # a quantized run: swap in empty quantized modules to load into
        from scratchlm.model.quant import apply_quantization

        apply_quantization(model, config["quantization"], where=str(run_dir / CONFIG_FILE))
    weights_path = run_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"run has no weights: {weights_path}")
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights {weights_path}: {e}") from None
    model.to(device)
    load_weights(model, tensors, source=str(weights_path))
    model.eval()
    return Run(model=model, tokenizer=load_run_tokenizer(run_dir), config=config, path=run_dir)


def load_run_tokenizer(run_dir: str | os.PathLike) -> Any:
    tok_dir = Path(run_dir) / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        return None
    from scratchlm.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)
