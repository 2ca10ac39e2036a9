"""The SFT and DPO stages end to end: parent run dir in, fine-tuned run dir out.

`run_sft(model_dir, out, config)` and `run_dpo(model_dir, out, config)`:
1. load the parent run (pretrained for SFT, SFT'd for DPO) and its tokenizer; add the chat
   tokens if missing and grow the embeddings to match;
2. read the data (`config.sft.data` / `config.dpo.data`; files or `builtin:python-stdlib`) and
   its held-out split, reporting skipped rows by file:line;
3. LoRA/QLoRA as `config.lora` says (rank 0 = full fine-tuning);
4. DPO only: the reference log-probabilities of every pair, computed once with the policy as it
   starts (= the reference) and cached in `out/reference_logps.safetensors`;
5. train on `scratchlm.train.trainer.train` (re-running on the same `out` resumes exactly);
6. write the run dir: `model.safetensors` (plain weights, adapters merged: every later stage
   reads it like a pretrained run), `tokenizer/` (with the chat tokens), `config.json`
   (with a `chat` section holding the HF Jinja template), and with LoRA `adapter/` alone.
Not for the losses or batching (sft.py, dpo.py) or the CLI parsing (cli.py).
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path
from typing import Callable

import torch

from scratchlm.errors import UserError
from scratchlm.posttrain.common import (
    ADAPTER_DIR,
    merged_state_dict_any,
    prepare_chat_vocab,
    register_config_sections,
    setup_lora,
)

# Defaults that suit fine-tuning better than pretraining's (applied before recipe and --set).
SFT_TRAIN_DEFAULTS = {"lr": 1e-4, "warmup_steps": 10, "max_steps": 200, "seq_len": 512,
                      "micro_batch_size": 8, "eval_every": 50, "ckpt_every": 50, "weight_decay": 0.0,
                      "log_every": 5}
DPO_TRAIN_DEFAULTS = {"lr": 5e-6, "warmup_steps": 10, "max_steps": 200, "seq_len": 512,
                      "micro_batch_size": 4, "eval_every": 50, "ckpt_every": 50, "weight_decay": 0.0,
                      "grad_clip": 1.0, "log_every": 5}
LORA_LR = 1e-3  # adapters start at zero and want a larger step than full fine-tuning


def stage_config(stage: str, recipe=None, overrides=(), lora_rank: int | None = None):
    """The resolved config for `sft` or `dpo`: fine-tuning defaults, then a recipe, then --set."""
    from scratchlm.config import load_config

    register_config_sections()
    defaults = dict(SFT_TRAIN_DEFAULTS if stage == "sft" else DPO_TRAIN_DEFAULTS)
    if lora_rank and stage == "sft":
        defaults["lr"] = LORA_LR
    overrides = list(overrides)
    if lora_rank is not None:  # an explicit flag wins over the recipe
        overrides.insert(0, f"lora.rank={lora_rank}")
    return load_config(recipe, overrides, base={"train": defaults})


def _warn(message: str) -> None:
    print(f"scratchlm: {message}", file=sys.stderr, flush=True)


def _load_parent(model_dir):
    from scratchlm.runs import load_run

    parent = load_run(model_dir)
    if parent.tokenizer is None:
        raise UserError(f"{model_dir}: run has no tokenizer/ (fine-tuning needs the tokenizer it was trained with)")
    added = prepare_chat_vocab(parent.model, parent.tokenizer)
    if added:
        _warn(f"added chat tokens {', '.join(added)}; vocabulary now {parent.tokenizer.vocab_size}")
    return parent


def _check_seq_len(config, model, default: int) -> None:
    if config.train.seq_len > model.config.max_seq_len and config.train.seq_len == default:
        # the stage's default window, not the user's choice: fit it to the model
        config.train.seq_len = model.config.max_seq_len
    if config.train.seq_len > model.config.max_seq_len:
        raise UserError(f"train.seq_len ({config.train.seq_len}) exceeds the model's max_seq_len "
                        f"({model.config.max_seq_len}); pass --set train.seq_len={model.config.max_seq_len}")


def _split(items: list, val_specs, data_specs, fraction: float, seed: int, heldout_loader):
    """(train, val): explicit val files, the builtin held-out split, or a seeded share."""
    if val_specs:
        return items, heldout_loader(val_specs)
    builtin = [s for s in data_specs if str(s).startswith("builtin:")]
    if builtin and len(builtin) == len(data_specs):
        return items, heldout_loader([f"{s}:heldout" if ":heldout" not in s else s for s in builtin])
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(items) * fraction)))
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def _read_examples(what: str, cfg, seed: int, read, build, unit: str, drop_reason: str, progress: bool):
    """Read a stage's data (bad rows reported), cap it, split off the held-out part, and build
    examples of both parts: (train examples, val examples). Shared by SFT and DPO."""
    from scratchlm.posttrain.data import ReadReport

    report = ReadReport()
    items = read(cfg.data, strict=cfg.strict, report=report)
    _report(report, what)
    if cfg.max_examples:
        items = items[: cfg.max_examples]
    train_items, val_items = _split(items, cfg.val_data, cfg.data, cfg.val_fraction, seed,
                                    lambda specs: read(specs, strict=cfg.strict))
    train_examples, dropped = build(train_items)
    val_examples, _ = build(val_items)
    if dropped:
        _warn(f"{dropped} {unit} {drop_reason}; dropped")
    if progress:
        _warn(f"{what}: {len(train_examples)} training {unit}, {len(val_examples)} held out")
    return train_examples, val_examples


def _report(report, what: str) -> None:
    for problem in report.problems:
        _warn(f"skipped {problem}")
    if report.skipped > len(report.problems):
        _warn(f"... and {report.skipped - len(report.problems)} more bad {what} rows skipped")


def _record_model(config, model) -> None:
    config.model.preset = model.config.preset
    config.model.overrides = {k: v for k, v in model.config.to_dict().items() if k != "preset"}


def _device_and_dtype(config):
    from scratchlm.train.trainer import resolve_device, resolve_dtype

    device = resolve_device(config.train.device)
    return device, resolve_dtype(config.train.dtype, device)


def save_finetuned_run(out, model, tokenizer, config, stage: str, parent: str) -> Path:
    """Write the run dir; with LoRA, merged plain weights plus `adapter/` alone."""
    from scratchlm.model.lora import has_lora, save_adapters
    from scratchlm.model.transformer import Transformer
    from scratchlm.posttrain.chat_template import CHAT_SPECIAL_TOKENS, HF_CHAT_TEMPLATE
    from scratchlm.runs import save_run
    from scratchlm.train.checkpoint import load_weights

    out = Path(out)
    plain = model
    if has_lora(model):
        save_adapters(out / ADAPTER_DIR, model, config.lora.lora_config())
        plain = Transformer(model.config)
        load_weights(plain, {k: v.detach().cpu() for k, v in merged_state_dict_any(model).items()},
                     source="merged LoRA weights")
    d = config.to_dict()
    d["stage"] = {"name": stage, "parent": str(parent)}
    d["chat"] = {"special_tokens": list(CHAT_SPECIAL_TOKENS), "hf_chat_template": HF_CHAT_TEMPLATE}
    return save_run(out, plain.cpu(), tokenizer, d)


# ---------------------------------------------------------------------------------------------
# SFT


def run_sft(model_dir, out, config=None, *, on_step: Callable | None = None, progress: bool = True):
    """Fine-tune the run at `model_dir` on conversations; write the run dir `out`."""
    from scratchlm.posttrain.data import load_conversations
    from scratchlm.posttrain.sft import SFTTask, build_examples
    from scratchlm.train.trainer import train

    config = config or stage_config("sft")
    register_config_sections()
    parent = _load_parent(model_dir)
    model, tokenizer = parent.model, parent.tokenizer
    _check_seq_len(config, model, SFT_TRAIN_DEFAULTS["seq_len"])
    cfg = config.sft

    seq_len = config.train.seq_len
    train_examples, val_examples = _read_examples(
        "SFT", cfg, config.train.seed, load_conversations, lambda items: build_examples(tokenizer, items, seq_len),
        "conversations", f"had no assistant token within train.seq_len={seq_len}", progress)

    torch.manual_seed(config.train.seed)
    setup_lora(model, config.lora)
    _record_model(config, model)
    device, _ = _device_and_dtype(config)
    task = SFTTask(train_examples, val_examples, seq_len, config.train.micro_batch_size,
                   pad_id=_pad_id(tokenizer), packing=cfg.packing, seed=config.train.seed, device=device,
                   eval_batches=config.train.eval_batches)
    model.train()
    result = train(config, model, task, out, on_step=on_step)
    save_finetuned_run(out, model, tokenizer, config, "sft", model_dir)
    return result


def _pad_id(tokenizer) -> int:
    return tokenizer.eot_id if tokenizer.eot_id is not None else 0


# ---------------------------------------------------------------------------------------------
# DPO


def run_dpo(model_dir, out, config=None, *, on_step: Callable | None = None, progress: bool = True):
    """Align the run at `model_dir` (an SFT run) on preference pairs; write the run dir `out`."""
    from scratchlm.posttrain.data import load_preference_pairs
    from scratchlm.posttrain.dpo import DPOTask, build_pair_examples
    from scratchlm.train.trainer import train

    config = config or stage_config("dpo")
    register_config_sections()
    cfg = config.dpo
    check_dpo_config(cfg)
    parent = _load_parent(model_dir)
    model, tokenizer = parent.model, parent.tokenizer
    _check_seq_len(config, model, DPO_TRAIN_DEFAULTS["seq_len"])

    seq_len = config.train.seq_len
    train_examples, val_examples = _read_examples(
        "DPO", cfg, config.train.seed, load_preference_pairs,
        lambda items: build_pair_examples(tokenizer, items, seq_len),
        "pairs", f"had an answer entirely beyond train.seq_len={seq_len}", progress)

    torch.manual_seed(config.train.seed)
    setup_lora(model, config.lora)  # adapters start at zero: the policy *is* the reference now
    _record_model(config, model)
    device, dtype = _device_and_dtype(config)
    model.to(device)
    pad_id = _pad_id(tokenizer)
    train_ref, val_ref = reference_logps(Path(out), model, train_examples, val_examples, config, pad_id,
                                         device, dtype, progress, Path(model_dir))
    task = DPOTask(train_examples, val_examples, train_ref, val_ref, config.train.micro_batch_size, pad_id,
                   beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                   seed=config.train.seed, device=device, eval_batches=config.train.eval_batches)
    model.train()
    result = train(config, model, task, out, on_step=on_step)
    save_finetuned_run(out, model, tokenizer, config, "dpo", model_dir)
    return result


def check_dpo_config(cfg) -> None:
    from scratchlm.posttrain.dpo import LOSS_TYPES

    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    if cfg.beta <= 0:
        raise UserError(f"dpo.beta must be positive, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"dpo.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.label_smoothing and cfg.loss_type != "conservative":
        raise UserError("dpo.label_smoothing applies to dpo.loss_type=conservative only")


def reference_logps(out: Path, model, train_examples, val_examples, config, pad_id, device, dtype,
                    progress: bool, parent_dir: Path):
    """The cached reference log-probs, or computed now (policy at its start) and cached."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from scratchlm.files import atomic_write, sha256_file
    from scratchlm.posttrain.dpo import REFERENCE_FILE, compute_reference_logps
    from scratchlm.train.trainer import autocast_context

    # the reference is the base: QLoRA's quantized base gives other numbers than the float one
    key = _reference_key(train_examples, val_examples, parent_dir, sha256_file,
                         f"{dtype}|qlora={config.lora.qlora_bits if config.lora.rank else 0}")
    path = out / REFERENCE_FILE
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                saved_key = (f.metadata() or {}).get("key")
            if saved_key == key:
                tensors = load_file(str(path))
                return tensors["train"], tensors["val"]
            _warn(f"{path} was computed for other data or another model; recomputing")
        except (SafetensorError, OSError, KeyError):
            _warn(f"{path} is unreadable; recomputing")
    batch = max(1, config.train.micro_batch_size)
    with autocast_context(device, dtype):
        train_ref = compute_reference_logps(model, train_examples, batch, pad_id, device, progress, "reference (train)")
        val_ref = compute_reference_logps(model, val_examples, batch, pad_id, device, progress, "reference (val)")
    out.mkdir(parents=True, exist_ok=True)
    data = save({"train": train_ref.contiguous(), "val": val_ref.contiguous()}, metadata={"key": key})
    atomic_write(path, lambda f: f.write(data), "wb")
    return train_ref, val_ref


def _reference_key(train_examples, val_examples, parent_dir: Path, sha256_file, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(sha256_file(parent_dir / "model.safetensors").encode())
    h.update(dtype.encode())
    for examples in (train_examples, val_examples):
        h.update(b"|")
        for ex in examples:
            for inputs, targets in (ex.chosen, ex.rejected):
                h.update(repr((inputs, targets)).encode())
    return h.hexdigest()
