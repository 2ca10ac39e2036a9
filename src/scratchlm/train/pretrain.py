"""Pretraining: next-token prediction on a dataset dir, through the shared training loop.

`pretrain(data, out, config)` opens and verifies the dataset, finds its tokenizer and refuses a
mismatch, builds the model from `config.model` (vocabulary from the tokenizer), and runs
`trainer.train` with a `PretrainTask`; at the end it writes the run dir (`scratchlm.runs`).
Running it again on the same `out` resumes from the latest valid checkpoint.
`PretrainTask` is the task object the loop asks for batches, the loss and evaluation: mean
cross-entropy on train windows; validation loss and bits per byte on fixed val windows.
Not for fine-tuning data or losses (see `scratchlm.posttrain`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scratchlm.config import Config
from scratchlm.errors import UserError

TOKENIZER_SUBDIR = "tokenizer"


class PretrainTask:
    """Batches of token windows, their cross-entropy, and validation loss / bits per byte."""

    def __init__(self, dataset, train_cfg, data_cfg, token_bytes: torch.Tensor | None = None,
                 rank: int = 0, world_size: int = 1, strategy=None, tokenizer=None, eval_cfg=None):
        from scratchlm.data.loader import TokenLoader

        self.dataset = dataset
        self.seq_len = train_cfg.seq_len
        self.batch_size = train_cfg.micro_batch_size
        self.eval_batches = train_cfg.eval_batches
        self.rank, self.world_size = rank, world_size
        self.doc_mask = data_cfg.doc_mask
        self.strategy = strategy
        self.fused_loss = train_cfg.fused_loss
        self.loader = TokenLoader(dataset, split="train", seq_len=self.seq_len,
                                  batch_size=self.batch_size, seed=train_cfg.seed, rank=rank,
                                  world_size=world_size, mode=data_cfg.mode,
                                  with_doc_ids=self.doc_mask)
        self.token_bytes = token_bytes
        self.tokenizer = tokenizer
        self.eval_cfg = eval_cfg
        self._val_plan = self._plan_validation()

    # -- training ------------------------------------------------------------------------------

    def next_batch(self):
        return self.loader.next_batch()

    def split_batch(self, batch, parts: int) -> list[tuple]:
        """The batch as `parts` equal groups of rows (the trainer's CPU workers take one each;
        every window has the same number of targets, so the mean of their losses is exact)."""
        from scratchlm.train.cpu_workers import split_rows

        return split_rows(batch, parts)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float], int]:
        inputs, targets, doc_ids = self._to_device(model, batch)
        kwargs = {"doc_ids": doc_ids} if doc_ids is not None else {}
        if self.fused_loss and can_fuse_head(model):
            return next_token_loss_fused(model, inputs, targets, **kwargs), {}, targets.numel()
        logits = model(inputs, **kwargs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return loss, {}, targets.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

    # -- validation ----------------------------------------------------------------------------

    def _plan_validation(self) -> tuple[int, int] | None:
        """(batch size, batches) of val windows each rank reads, or None without a val split."""
        windows = max(0, (self.dataset.num_tokens("val") - 1) // self.seq_len)
        per_rank = windows // self.world_size
        if per_rank == 0 or self.eval_batches <= 0:
            return None
        batch = min(self.batch_size, per_rank)
        return batch, max(1, min(self.eval_batches, per_rank // batch))

    def evaluate(self, model) -> dict[str, float]:
        """Validation loss and bits per byte, plus benchmark tasks when `eval.tasks_dir` is set."""
        out = self._validation_loss(model)
        if self.eval_cfg is not None and self.eval_cfg.tasks_dir and self.tokenizer is not None \
                and (self.strategy is None or self.rank == 0):
            from scratchlm.eval.tasks import quick_eval

            out.update(quick_eval(model, self.tokenizer, self.eval_cfg.tasks_dir,
                                  self.eval_cfg.tasks or None, limit=self.eval_cfg.limit))
        return out

    def _validation_loss(self, model) -> dict[str, float]:
        """Mean loss (nats/token) and bits per byte over the same val windows every time."""
        if self._val_plan is None:
            return {}
        from scratchlm.data.loader import TokenLoader

        batch_size, n_batches = self._val_plan
        loader = TokenLoader(self.dataset, split="val", seq_len=self.seq_len, batch_size=batch_size,
                             rank=self.rank, world_size=self.world_size, mode="sequential",
                             with_doc_ids=self.doc_mask)
        sums = torch.zeros(4, dtype=torch.float64)  # nats, tokens, nats on byte tokens, bytes
        for _ in range(n_batches):
            inputs, targets, doc_ids = self._to_device(model, loader.next_batch())
            logits = model(inputs, doc_ids=doc_ids) if doc_ids is not None else model(inputs)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            sums[0] += losses.sum().item()
            sums[1] += losses.numel()
            if self.token_bytes is not None:
                nbytes = self.token_bytes.to(targets.device)[targets.flatten()]
                # special tokens are 0 bytes: they are not text, so they do not count in bpb
                sums[2] += (losses * (nbytes > 0)).sum().item()
                sums[3] += nbytes.sum().item()
        if self.strategy is not None:
            sums = torch.tensor([self.strategy.sum(float(v)) for v in sums], dtype=torch.float64)
        out = {"val_loss": float(sums[0] / sums[1])}
        if self.token_bytes is not None and sums[3] > 0:
            out["val_bpb"] = float(sums[2] / (math.log(2) * sums[3]))
        return out

    @staticmethod
    def _to_device(model, batch):
        device = _model_device(model)
        inputs, targets = batch[0], batch[1]
        doc_ids = batch[2] if len(batch) > 2 else None
        non_blocking = device.type == "cuda"
        inputs = inputs.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        if doc_ids is not None:
            doc_ids = doc_ids.to(device, non_blocking=non_blocking)
        return inputs, targets, doc_ids


def can_fuse_head(model) -> bool:
    """The fused loss needs the model itself (a wrapper's forward must run as it is)."""
    from scratchlm.model.transformer import Transformer

    return isinstance(model, Transformer) and isinstance(getattr(model, "lm_head", None), torch.nn.Linear) \
        and model.lm_head.bias is None


def next_token_loss_fused(model, inputs, targets, **kwargs) -> torch.Tensor:
    """Cross-entropy with the output head fused into the loss (see `scratchlm.train.losses`).

    The model returns its final hidden states (`logits=False`); the head's weight (tied or not)
    gets its gradient through the fused function. The model is not modified, so threads may run
    this on one model at the same time (the trainer's CPU workers do).
    """
    from scratchlm.train.losses import fused_linear_cross_entropy

    h = model(inputs, logits=False, **kwargs)
    return fused_linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, targets.flatten())


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """Bytes of text each id stands for; 0 for special tokens and ids beyond the tokenizer."""
    specials = set(getattr(tokenizer, "special_tokens", {}).values())
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for token_id in range(min(vocab_size, tokenizer.vocab_size)):
        if token_id not in specials:
            lengths[token_id] = len(tokenizer.token_bytes(token_id))
    return lengths


# ---------------------------------------------------------------------------------------------
# Putting it together


def find_tokenizer(data_dir: Path, tokenizer_dir: str | os.PathLike | None):
    """The tokenizer given, or the one stored with the dataset (DATA/tokenizer)."""
    from scratchlm.tokenizer import load_tokenizer

    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir)
    candidate = Path(data_dir) / TOKENIZER_SUBDIR
    if (candidate / "tokenizer.json").is_file():
        return load_tokenizer(candidate)
    raise UserError(f"no tokenizer found with dataset {data_dir} (looked for {candidate}/tokenizer.json); "
                    "pass --tokenizer DIR (the one `data prepare` used)")


def resolve_model_config(config: Config, vocab_size: int, seq_len: int):
    """The `ModelConfig` of `config.model`, sized to the tokenizer and the training windows."""
    from scratchlm.model.config import ModelConfig, model_config

    overrides = dict(config.model.overrides)
    overrides.setdefault("vocab_size", vocab_size)
    if config.model.preset:
        base = model_config(config.model.preset, **overrides)
    else:
        base = ModelConfig(**overrides)
    if base.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size ({base.vocab_size}) is smaller than the tokenizer's "
                        f"vocabulary ({vocab_size})")
    if base.max_seq_len < seq_len:
        if "max_seq_len" in config.model.overrides:
            raise UserError(f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({base.max_seq_len})")
        base = base.replace(max_seq_len=seq_len)
    return base


def pretrain(data: str | os.PathLike, out: str | os.PathLike, config: Config | None = None, *,
             tokenizer_dir: str | os.PathLike | None = None, strategy=None, on_step=None):
    """Pretrain a model on the dataset dir `data`, writing the run dir `out`; resumes if it can."""
    from scratchlm.data.shards import Dataset
    from scratchlm.model.transformer import Transformer
    from scratchlm.runs import save_run
    from scratchlm.train.trainer import train

    config = config or Config()
    if strategy is None:
        from scratchlm.train.parallel import strategy_from_config

        strategy = strategy_from_config(config)
    data_dir = Path(data)
    config.data.path = str(data_dir)
    dataset = Dataset.open(data_dir)
    tokenizer = find_tokenizer(data_dir, tokenizer_dir or config.data.tokenizer or None)
    if tokenizer_dir:
        config.data.tokenizer = str(tokenizer_dir)
    dataset.verify_tokenizer(tokenizer.fingerprint, tokenizer.vocab_size)

    model_cfg = resolve_model_config(config, tokenizer.vocab_size, config.train.seq_len)
    # the resolved model goes into the config, so checkpoints and config.json say exactly what ran
    config.model.preset = model_cfg.preset
    config.model.overrides = {k: v for k, v in model_cfg.to_dict().items() if k != "preset"}
    check_resume_compatible(Path(out), config)

    torch.manual_seed(config.train.seed)
    model = Transformer(model_cfg)
    task = PretrainTask(dataset, config.train, config.data,
                        token_bytes=token_byte_lengths(tokenizer, model_cfg.vocab_size),
                        rank=strategy.data_rank, world_size=strategy.data_world_size,
                        strategy=strategy if strategy.data_world_size > 1 else None,
                        tokenizer=tokenizer, eval_cfg=config.eval)
    result = train(config, model, task, out, strategy=strategy, on_step=on_step)
    # a sharded model is gathered into a plain one (a collective: every rank takes part)
    final_model = strategy.model_for_saving(model) if hasattr(strategy, "model_for_saving") else model
    if strategy.is_main:
        save_run(out, final_model.cpu(), tokenizer, config)
    return result


def check_resume_compatible(out_dir: Path, config: Config) -> None:
    """Refuse to resume a run with a different model; report other changed settings."""
    from scratchlm.train.checkpoint import CheckpointManager
    from scratchlm.train.trainer import CHECKPOINT_DIR

    manager = CheckpointManager(out_dir / CHECKPOINT_DIR)
    path = manager.latest_valid(warn=lambda msg: None)
    if path is None:
        return
    from scratchlm.files import read_json

    saved = read_json(path / "state.json", "checkpoint state").get("config", {})
    current = config.to_dict()
    changed_model = _changed_keys(saved.get("model", {}), current["model"], "model")
    if changed_model:
        raise UserError(f"{out_dir} holds a run of a different model ({', '.join(changed_model)} "
                        f"changed); use a new --out, or the old settings to resume")
    changed = []
    for section in ("train", "data"):
        changed += _changed_keys(saved.get(section, {}), current.get(section, {}), section)
    changed = [k for k in changed if k not in ("data.path", "data.tokenizer", "train.progress")]
    if changed:
        print(f"scratchlm: resuming {out_dir} with changed settings: {', '.join(changed)}",
              file=sys.stderr)


def _changed_keys(old: dict, new: dict, section: str) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{section}.{k}" for k in keys if old.get(k) != new.get(k)]
