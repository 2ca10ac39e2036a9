"""Supervised fine-tuning: conversations in, a chat model out, on the one training loop.

`SFTTask` renders every conversation with the chat template once, then serves batches to
`scratchlm.train.trainer.train`:
- packing (default): conversations are laid end to end in windows of `train.seq_len` tokens,
  each with its own `doc_ids` (attention stays inside a conversation) and positions restarting
  at 0, so a packed conversation is computed exactly as it would be alone; a conversation that
  does not fit in what is left of a window starts the next one (the rest is padding);
- padding: one conversation per row, right-padded to the longest in the batch.
The loss is the mean cross-entropy over assistant tokens only (prompt tokens have target
IGNORE and get no gradient). The order is a seeded shuffle per epoch; the task's state is
(epoch, cursor), so a resumed run draws exactly the batches an uninterrupted one would.

The whole stage (parent run in, run dir out) is `scratchlm.posttrain.pipeline.run_sft`.
Not for the chat template itself (chat_template.py) or DPO (dpo.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.posttrain.chat_template import render_chat
from scratchlm.posttrain.common import IGNORE, check_same_data, examples_fingerprint, pad_rows, shift_example


@dataclass
class SFTConfig:
    """The `sft` config section."""

    data: list[str] = field(default_factory=lambda: ["builtin:python-stdlib"])
    val_data: list[str] = field(default_factory=list)  # empty: the builtin held-out split, or
    val_fraction: float = 0.05  # ... this share of the training conversations
    packing: bool = True  # False: one conversation per row, padded
    strict: bool = False  # a bad data row is an error instead of a skipped, reported line
    max_examples: int = 0  # 0 = all


@dataclass
class Example:
    inputs: list[int]
    targets: list[int]

    @property
    def n_trained(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def build_examples(tokenizer, conversations: Sequence[list[dict]], seq_len: int) -> tuple[list[Example], int]:
    """Render and cut each conversation; those left with no assistant token are dropped.

    Returns (examples, number dropped).
    """
    examples, dropped = [], 0
    for messages in conversations:
        ids, mask = render_chat(tokenizer, messages)
        inputs, targets = shift_example(ids, mask, seq_len)
        example = Example(inputs, targets)
        if example.n_trained == 0:
            dropped += 1
            continue
        examples.append(example)
    return examples, dropped


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over targets != IGNORE, and how many there were."""
    n = int((targets != IGNORE).sum())
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum / max(n, 1), n


class SFTTask:
    """The SFT task for the training loop (see module docstring)."""

    def __init__(
        self,
        train_examples: list[Example],
        val_examples: list[Example],
        seq_len: int,
        batch_size: int,
        pad_id: int,
        packing: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        eval_batches: int = 0,
    ):
        if not train_examples:
            raise UserError("no training conversations left (all rows were bad or had no assistant tokens)")
        self.train_examples = train_examples
        self.val_examples = val_examples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.seed = seed
        self.device = torch.device(device)
        self.eval_batches = eval_batches
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)
        self.fingerprint = examples_fingerprint((e.inputs, e.targets) for e in train_examples)

    # -- order and state --------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    def _next_example(self) -> Example:
        if self.cursor >= len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order(self.epoch)
        example = self.train_examples[self._order[self.cursor]]
        self.cursor += 1
        return example

    def _peek_example(self) -> Example:
        if self.cursor >= len(self._order):
            return self.train_examples[self._epoch_order(self.epoch + 1)[0]]
        return self.train_examples[self._order[self.cursor]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "data": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        check_same_data(state, self.fingerprint)
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / len(self.train_examples)

    # -- batches ----------------------------------------------------------------------------------

    def next_batch(self) -> dict:
        if self.packing:
            rows = [self._packed_row() for _ in range(self.batch_size)]
            return self._to_device(_stack_packed(rows, self.pad_id, self.seq_len))
        examples = [self._next_example() for _ in range(self.batch_size)]
        inputs, targets = pad_rows([(e.inputs, e.targets) for e in examples], self.pad_id)
        n_tokens = torch.tensor([len(e.inputs) for e in examples])
        return self._to_device({"inputs": inputs, "targets": targets, "n_tokens": n_tokens})

    def _packed_row(self) -> list[Example]:
        row, used = [], 0
        while True:
            candidate = self._peek_example()
            if row and used + len(candidate.inputs) > self.seq_len:
                return row
            row.append(self._next_example())
            used += len(candidate.inputs)
            if used >= self.seq_len:
                return row

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- loss and evaluation ----------------------------------------------------------------------

    def loss(self, model, batch: dict):
        logits = model(batch["inputs"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
        loss, n = masked_lm_loss(logits, batch["targets"])
        return loss, {"trained_tokens": n, "epoch": round(self.epochs_done, 4)}, int(batch["n_tokens"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.val_examples:
            return {}
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        examples = self.val_examples
        if self.eval_batches:
            examples = examples[: self.eval_batches * self.batch_size]
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            inputs, targets = pad_rows([(e.inputs, e.targets) for e in chunk], self.pad_id)
            logits = model(inputs.to(self.device))
            loss, n = masked_lm_loss(logits, targets.to(self.device))
            total += loss.item() * n
            count += n
        model.train(was_training)
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def _stack_packed(rows: list[list[Example]], pad_id: int, seq_len: int) -> dict:
    """Packed rows -> inputs, targets, positions (restarting per conversation), doc_ids [B, T]."""
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    doc_ids = torch.zeros((B, seq_len), dtype=torch.long)
    n_tokens = torch.zeros(B, dtype=torch.long)
    for b, row in enumerate(rows):
        offset = 0
        for doc, example in enumerate(row, start=1):
            n = min(len(example.inputs), seq_len - offset)
            inputs[b, offset:offset + n] = torch.tensor(example.inputs[:n])
            targets[b, offset:offset + n] = torch.tensor(example.targets[:n])
            positions[b, offset:offset + n] = torch.arange(n)
            doc_ids[b, offset:offset + n] = doc
            offset += n
        n_tokens[b] = offset
        if offset < seq_len:  # padding: its own document, positions counting on
            positions[b, offset:] = torch.arange(seq_len - offset)
            doc_ids[b, offset:] = len(row) + 1
    return {"inputs": inputs, "targets": targets, "positions": positions, "doc_ids": doc_ids, "n_tokens": n_tokens}
