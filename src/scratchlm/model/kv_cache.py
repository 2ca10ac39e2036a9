"""The key/value cache for incremental decoding: preallocated static buffers, one pair per layer.

Buffers are `[batch, n_kv_head, max_len, head_dim]` (GQA-aware: only the key/value heads are
stored), allocated once so decoding never reallocates and shapes stay static for compilation.
`Transformer.forward(..., kv_cache=cache)` writes the new keys/values at `cache.length` in every
layer and then advances `length`. Not for sampling or batching policy (see `scratchlm.infer`).
"""

from __future__ import annotations

import torch

from scratchlm.model.config import ModelConfig


class KVCache:
    """Static per-layer key/value buffers plus how many positions they hold (`length`)."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0

    @classmethod
    def for_config(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "KVCache":
        """A cache shaped for a model config; `max_len` defaults to the model's `max_seq_len`."""
        return cls(
            config.n_layer, batch_size, config.n_kv_head, max_len or config.max_seq_len,
            config.head_dim, dtype=dtype, device=device,
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, n_kv_head, T, D] keys/values at `length`; return everything held so far.

        `length` itself moves only in `advance`, once every layer has written its slice.
        """
        B, T = k.shape[0], k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} positions exceed max_len {self.max_len}")
        if B > self.batch_size:
            raise ValueError(f"batch of {B} does not fit a KV cache made for {self.batch_size}")
        self.keys[layer_idx][:B, :, self.length : end] = k
        self.values[layer_idx][:B, :, self.length : end] = v
        return self.keys[layer_idx][:B, :, :end], self.values[layer_idx][:B, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
