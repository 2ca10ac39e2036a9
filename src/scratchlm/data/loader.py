"""Batches of `seq_len` token windows from a dataset dir, for pretraining, resumable exactly.

A split is one token stream (its shards in order). An epoch cuts it into windows of
`seq_len + 1` tokens at stride `seq_len` (inputs `w[:-1]`, targets `w[1:]`; the input positions
of two windows never overlap, nor do their target positions), starting at an offset. In
`random` mode the offset and the order of the windows are drawn afresh each epoch from
`(seed, epoch)`; in `sequential` mode the offset is 0 and windows come in stream order.

Every rank walks the same sequence of global window slots: a step takes `batch_size *
world_size` slots and rank `r` keeps slots `b * world_size + r`, so ranks see disjoint windows
and the state (epoch, cursor) is the same on all ranks. Because the window sequence is a pure
function of the seed, `state_dict()` / `load_state_dict()` resume to exactly the batches an
uninterrupted run would have produced. Not for reading raw text or for SFT/DPO batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scratchlm.data.shards import Dataset, verify_tokenizer_match
from scratchlm.errors import UserError

STATE_VERSION = 1
MODES = ("random", "sequential")


class TokenLoader:
    def __init__(self, data: Dataset | str | os.PathLike, split: str = "train", seq_len: int = 256,
                 batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mode: str = "random", with_doc_ids: bool = False):
        self.dataset = data if isinstance(data, Dataset) else Dataset.open(Path(data))
        if mode not in MODES:
            raise UserError(f"loader mode must be one of {', '.join(MODES)}, got {mode!r}")
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive ({seq_len}, {batch_size})")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
        self.split, self.mode, self.seed = split, mode, int(seed)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.with_doc_ids = with_doc_ids
        self.eot_id = self.dataset.eot_id
        self._shards = self.dataset.shard_arrays(split)
        lengths = np.array([s.size for s in self._shards], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(lengths)])
        self.total_tokens = int(self._shard_starts[-1])
        if self._windows_in(0) == 0:
            raise UserError(
                f"dataset {self.dataset.path}: split {split!r} has {self.total_tokens} tokens, "
                f"fewer than one window of seq_len + 1 = {self.seq_len + 1}")
        self.epoch = 0
        self.cursor = 0  # the next global window slot inside this epoch
        self._epoch_cache: tuple[int, int, np.ndarray | None] | None = None

    # -- the window sequence --------------------------------------------------------------
    def _windows_in(self, offset: int) -> int:
        return max(0, (self.total_tokens - 1 - offset) // self.seq_len)

    def _epoch_plan(self, epoch: int) -> tuple[int, int, np.ndarray | None]:
        """(offset, number of windows, order) for an epoch; order None means stream order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1:]
        if self.mode == "sequential":
            offset, order = 0, None
            count = self._windows_in(0)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.seq_len))
            if self._windows_in(offset) == 0:
                offset = 0
            count = self._windows_in(offset)
            order = rng.permutation(count)
        self._epoch_cache = (epoch, offset, count, order)
        return offset, count, order

    def _take_slots(self, n: int) -> list[int]:
        """Stream positions of the next n global window slots; advances the state."""
        starts = []
        while len(starts) < n:
            offset, count, order = self._epoch_plan(self.epoch)
            take = min(n - len(starts), count - self.cursor)
            slots = np.arange(self.cursor, self.cursor + take)
            windows = slots if order is None else order[slots]
            starts.extend((offset + windows * self.seq_len).tolist())
            self.cursor += take
            if self.cursor == count:
                self.epoch, self.cursor = self.epoch + 1, 0
        return starts

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the split's stream from `start`, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        while length > 0:
            local = start - int(self._shard_starts[shard])
            piece = self._shards[shard][local:local + length]
            pieces.append(piece)
            start += piece.size
            length -= piece.size
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    # -- the public API -------------------------------------------------------------------
    def next_batch(self):
        """(inputs, targets) int64 [B, T], plus doc_ids [B, T] when `with_doc_ids`."""
        starts = self._take_slots(self.batch_size * self.world_size)
        mine = starts[self.rank::self.world_size]
        windows = np.stack([self._read(s, self.seq_len + 1) for s in mine]).astype(np.int64)
        inputs = torch.from_numpy(windows[:, :-1].copy())
        targets = torch.from_numpy(windows[:, 1:].copy())
        if not self.with_doc_ids:
            return inputs, targets
        # The end-of-text token opens each document, so a running count of them numbers the
        # documents inside a window; positions with equal ids may attend to each other.
        doc_ids = torch.cumsum(inputs == self.eot_id, dim=1)
        return inputs, targets, doc_ids

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor,
            "seed": self.seed, "mode": self.mode, "split": self.split,
            "seq_len": self.seq_len, "split_tokens": self.total_tokens,
            "tokenizer_sha256": self.dataset.tokenizer_sha256,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; refuses one saved over another window sequence."""
        for key in ("seed", "mode", "split", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"loader state has {key}={state.get(key)!r}, this loader has "
                                f"{getattr(self, key)!r}: it would not resume the same batches")
        if state.get("split_tokens") != self.total_tokens:
            raise UserError(f"loader state is for a split of {state.get('split_tokens')} tokens, "
                            f"this dataset's {self.split!r} split has {self.total_tokens}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def verify_tokenizer(self, fingerprint: str, vocab_size: int) -> None:
        """UserError unless the ids were made by this tokenizer and fit the model's vocabulary."""
        verify_tokenizer_match(self.dataset.index, fingerprint, vocab_size, self.dataset.path)

    def windows_in_epoch(self, epoch: int) -> int:
        """How many windows (global slots, all ranks together) an epoch holds."""
        return self._epoch_plan(epoch)[1]
