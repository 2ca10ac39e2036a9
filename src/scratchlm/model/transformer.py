"""The decoder-only Transformer, readable top to bottom: config in, logits out.

One class covers the presets the literature compares (Vaswani's post-LN original, GPT-2, LLaMA)
through `ModelConfig` switches. `embed`, the blocks in `layers`, and `head` are separate so
pipeline stages can run a slice of the model; module names are fixed by docs/internals.md
because LoRA, quantization, export and pipeline code address them.
Not for parallelism, checkpoint formats, conversions or losses: those adapt this from outside.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchlm.model import accounting
from scratchlm.model.config import ModelConfig
from scratchlm.model.kv_cache import KVCache
from scratchlm.model.layers import MLP, Attention, RMSNorm, make_norm, rope_cos_sin, sinusoidal_embeddings


class Block(nn.Module):
    """Attention then feed-forward, each with a residual connection and a norm (pre or post)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, kv_cache=None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2 / LLaMA: x + f(norm(x))
            x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, mask, kv_cache))
            x = x + self.resid_dropout(self.mlp(self.mlp_norm(x)))
        else:  # Vaswani et al.: norm(x + f(x)), "add & norm"
            x = self.attn_norm(x + self.resid_dropout(self.attn(x, rope, mask, kv_cache)))
            x = self.mlp_norm(x + self.resid_dropout(self.mlp(x)))
        return x


class Transformer(nn.Module):
    """Token ids in, next-token logits out: embed -> blocks -> head (docs/internals.md, Model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # post-LN blocks already end in a norm, so only pre-LN needs a final one
        self.norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.reset_parameters()

    # -- initialisation -----------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Initialise as the preset's paper does (see ModelConfig.init / scale_residual_init)."""
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and cfg.tie_embeddings:
                    continue  # shares the embedding matrix, initialised below
                if cfg.init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    std = cfg.init_std
                    if cfg.scale_residual_init and name.endswith(("o_proj", "down_proj")):
                        # GPT-2: residual projections scaled by 1/sqrt(N) with N = 2 per layer,
                        # so the residual stream's variance does not grow with depth
                        std = std / math.sqrt(2 * cfg.n_layer)
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # Xavier-era models scale embeddings by sqrt(d_model), so start them at 1/sqrt(d)
                std = cfg.d_model**-0.5 if cfg.init == "xavier" else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()  # weight 1, bias 0

    # -- the forward pass, in the order it runs ---------------------------------------------------

    def default_positions(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """0..T-1, or continuing after what the cache already holds: [B, T] int64."""
        start = kv_cache.length if kv_cache is not None else 0
        B, T = idx.shape
        return torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, d_model] (token + absolute position)."""
        cfg = self.config
        x = self.tok_embeddings(idx)
        if cfg.scale_embeddings:
            x = x * math.sqrt(cfg.d_model)
        if cfg.positions == "learned":
            x = x + self.pos_embeddings(positions)
        elif cfg.positions == "sinusoidal":
            x = x + sinusoidal_embeddings(positions, cfg.d_model).to(x.dtype)
        return self.embed_dropout(x)

    def attention_inputs(
        self,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """What every block's attention needs: RoPE (cos, sin) or None, and the bool mask.

        The mask is None on the plain causal path (training, prefill, one-token decode), which
        lets SDPA use its fast causal kernel; otherwise it is [B|1, 1, T, S], True = may attend.
        """
        cfg = self.config
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta) if cfg.positions == "rope" else None
        T = positions.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if attn_mask is None and doc_ids is None and (past == 0 or T == 1):
            return rope, None
        S = past + T
        # query i sits at cache slot past + i and may see slots 0..past + i
        mask = torch.ones(T, S, dtype=torch.bool, device=positions.device).tril(diagonal=past)[None, None]
        if doc_ids is not None:
            if past:
                raise ValueError("doc_ids cannot be combined with a non-empty KV cache")
            mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        if attn_mask is not None:
            mask = mask & attn_mask.to(torch.bool)
            # a query that may see nothing (a padding slot) would get NaN from the softmax and
            # spread it through the values; let it see everything instead (its output is unused)
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        return rope, mask

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, d_model] -> logits [B, T, vocab_size]."""
        return self.lm_head(self.norm(h))

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits: bool = True,
    ) -> torch.Tensor:
        """Next-token logits; with logits=False the final norm's output that lm_head would map
        (a loss that fuses the head takes that, through this call so module hooks still run)."""
        if positions is None:
            positions = self.default_positions(idx, kv_cache)
        if self.config.positions == "learned" and kv_cache is None and idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds max_seq_len {self.config.max_seq_len}")
        h = self.embed(idx, positions)
        rope, mask = self.attention_inputs(positions, attn_mask, doc_ids, kv_cache)
        for layer in self.layers:
            h = layer(h, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        h = self.norm(h)
        return self.lm_head(h) if logits else h

    # -- switches and accounting ------------------------------------------------------------------

    @property
    def attention_impl(self) -> str:
        return self.config.attention_impl

    @attention_impl.setter
    def attention_impl(self, impl: str) -> None:
        if impl not in ("sdpa", "reference"):
            raise ValueError(f"attention_impl must be 'sdpa' or 'reference', got {impl!r}")
        self.config.attention_impl = impl
        for layer in self.layers:
            layer.attn.impl = impl

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KVCache for this model on its device (dtype defaults to the weights' dtype)."""
        weight = self.tok_embeddings.weight
        return KVCache.for_config(self.config, batch_size, max_len, dtype or weight.dtype, weight.device)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights once); non_embedding drops the lookup tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= accounting.embedding_lookup_params(self.config)
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), 6N + attention (see accounting)."""
        return accounting.flops_per_token(self.config, seq_len or self.config.max_seq_len)

    def mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of `peak_flops`."""
        return tokens_per_sec * self.flops_per_token(seq_len) / peak_flops
