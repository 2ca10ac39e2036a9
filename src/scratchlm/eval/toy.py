"""Hand-built models and a byte tokenizer whose behaviour is known exactly, for checking evaluation.

`BigramModel` has logits that depend only on the previous token (a table you can set), so the
expected score of any benchmark item can be computed by hand, independently of the scorer.
`PrefixMeanModel` is a small causal model whose output at a position depends on every earlier
token and on the position, so padding or batching mistakes change its scores. `ByteTokenizer`
maps each UTF-8 byte to its own id, with `<|endoftext|>` as id 256.
Not for training or for real evaluation: they exist to test the evaluation code.
"""

from __future__ import annotations

import torch
from torch import nn

EOT_ID = 256


class ByteTokenizer:
    """Ids 0..255 are bytes; 256 is `<|endoftext|>`. The tokenizer interface evaluation uses."""

    vocab_size = 257
    eot_id = EOT_ID
    special_tokens = {"<|endoftext|>": EOT_ID}

    def encode(self, text: str, allowed_special=()) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if i < 256)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""


class BigramModel(nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next token depends on the current one only."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.table = nn.Parameter(table.float().clone(), requires_grad=False)
        self.max_seq_len = max_seq_len

    def forward(self, idx: torch.Tensor, **_) -> torch.Tensor:
        return self.table[idx]


class PrefixMeanModel(nn.Module):
    """Causal and position-aware: logits[t] = (mean of embeddings of idx[:t+1] + pos[t]) @ W."""

    def __init__(self, vocab_size: int = 257, dim: int = 16, max_seq_len: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab_size, dim, generator=g), requires_grad=False)
        self.pos = nn.Parameter(torch.randn(max_seq_len, dim, generator=g), requires_grad=False)
        self.out = nn.Parameter(torch.randn(dim, vocab_size, generator=g), requires_grad=False)
        self.max_seq_len = max_seq_len

    def forward(self, idx: torch.Tensor, **_) -> torch.Tensor:
        T = idx.shape[1]
        assert T <= self.max_seq_len, "input longer than the window"
        h = self.embed[idx].cumsum(dim=1) / torch.arange(1, T + 1, dtype=torch.float32)[None, :, None]
        return (h + self.pos[:T]) @ self.out
