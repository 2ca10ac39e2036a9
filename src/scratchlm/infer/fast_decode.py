"""A faster one-token decode step for a plain Transformer: fused, pre-transposed projection weights.

Decoding one token per row is a chain of matrix-vector products whose cost is reading the weights.
On CPU, `x @ Wt` with the weight stored transposed and contiguous (`[in, out]`) reads it markedly
faster than `F.linear(x, W)` at batch 1 (measured ~25% less CPU for this model's projections, ~3x
for an 8192-wide output head; not at batch 8, see FUSED_MAX_ROWS), and fusing q/k/v and gate/up into one matrix each halves the number
of matmul calls per layer. `FusedDecodeStep` holds such copies, built from a model's weights once,
and runs `Transformer.forward` for one new token per row with them; everything else (embedding,
positions, masks, norms, RoPE, attention, the KV cache) is the model's own code, so the result
equals the model's up to float rounding order in the matmuls.

The copies cost one extra set of block and head weights in memory; `fused_step_for(model)` builds
them lazily, keeps them with the model, and rebuilds them if any source weight changes. Models it
cannot mirror exactly (LoRA or quantized layers swapped in, post-norm blocks, autocast, training
mode) get None and decode through the model itself.
Not for prefill or training (the model's own forward does those), nor a change to the model's
parameters, names or state dict: LoRA, quantization and export never see these copies.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model.layers import apply_rope, attend

# Batch sizes up to which the fused step is the faster path. Measured on the 2-core Zen 4 box
# (docs/benchmarks.md, Inference): 1.30x less CPU per token at one row, but 0.92x (slower) at 8
# rows, where MKL's small-M GEMM on `F.linear`'s layout beats `x @ Wt`.
FUSED_MAX_ROWS = 1

_STEPS: "weakref.WeakKeyDictionary[nn.Module, FusedDecodeStep]" = weakref.WeakKeyDictionary()


def fused_step_for(model) -> "FusedDecodeStep | None":
    """The model's fused decode step (built on first use, rebuilt when its weights change), or
    None when the model is not one this step mirrors exactly."""
    if not supports(model):
        return None
    step = _STEPS.get(model)
    if step is None or step.signature != weight_signature(model):
        step = FusedDecodeStep(model)
        _STEPS[model] = step
    return step


def supports(model) -> bool:
    """True for an eval-mode pre-norm Transformer whose projections are all plain `nn.Linear`."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "layers") or model.training:
        return False
    if config.norm_position != "pre" or torch.is_autocast_enabled("cpu"):
        return False
    for linear in _source_linears(model):
        if type(linear) is not nn.Linear or not linear.weight.is_floating_point():
            return False
    return True


def _source_linears(model) -> list[nn.Module]:
    linears = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.up_proj, mlp.down_proj]
        if mlp.gate_proj is not None:
            linears.append(mlp.gate_proj)
    return linears + [model.lm_head]


def weight_signature(model) -> tuple:
    """Identity and version of every source weight: changes when any is replaced or updated."""
    sig = []
    for linear in _source_linears(model):
        for p in (linear.weight, linear.bias):
            if p is not None:
                sig.append((p.data_ptr(), p._version, p.dtype, p.device))
    return tuple(sig)


def _transposed(*weights: torch.Tensor) -> torch.Tensor:
    """`[in, out]` contiguous: the given `[out_i, in]` weights side by side."""
    return torch.cat([w.detach() for w in weights], dim=0).t().contiguous()


def _joined_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if linears[0].bias is None:
        return None
    return torch.cat([lin.bias.detach() for lin in linears]).contiguous()


def _project(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ weight_t [in, out] (+ bias)."""
    if bias is None:
        return torch.mm(x, weight_t)
    return torch.addmm(bias, x, weight_t)


class FusedLayer:
    """One block's projections, fused and transposed, plus references to its norms and settings."""

    def __init__(self, block) -> None:
        attn, mlp = block.attn, block.mlp
        with torch.no_grad():
            self.qkv_t = _transposed(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
            self.qkv_b = _joined_bias(attn.q_proj, attn.k_proj, attn.v_proj)
            self.o_t, self.o_b = _transposed(attn.o_proj.weight), _joined_bias(attn.o_proj)
            if mlp.gate_proj is not None:
                self.in_t = _transposed(mlp.gate_proj.weight, mlp.up_proj.weight)
                self.in_b = _joined_bias(mlp.gate_proj, mlp.up_proj)
            else:
                self.in_t, self.in_b = _transposed(mlp.up_proj.weight), _joined_bias(mlp.up_proj)
            self.down_t, self.down_b = _transposed(mlp.down_proj.weight), _joined_bias(mlp.down_proj)
        self.attn_norm, self.mlp_norm = block.attn_norm, block.mlp_norm
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.layer_idx, self.impl = attn.layer_idx, attn.impl
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        self.gated = mlp.gate_proj is not None
        self.activation, self.gelu_approximation = mlp.activation, mlp.gelu_approximation

    def __call__(self, x: torch.Tensor, rope, mask, kv_cache) -> torch.Tensor:
        """x [B, d_model] (one token per row) -> the block's output, as `Block.forward` computes it."""
        x = x + self.attention(self.attn_norm(x), rope, mask, kv_cache)
        return x + self.feed_forward(self.mlp_norm(x))

    def attention(self, x: torch.Tensor, rope, mask, kv_cache) -> torch.Tensor:
        B = x.shape[0]
        d_q, d_kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv = _project(x, self.qkv_t, self.qkv_b)
        q = qkv[:, :d_q].view(B, 1, self.n_head, self.head_dim)
        k = qkv[:, d_q:d_q + d_kv].view(B, 1, self.n_kv_head, self.head_dim)
        v = qkv[:, d_q + d_kv:].view(B, 1, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = kv_cache.update(self.layer_idx, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)
        y = attend(q, k, v, mask, self.impl)
        return _project(y.reshape(B, d_q), self.o_t, self.o_b)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _project(x, self.in_t, self.in_b)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "gelu":
            h = F.gelu(h, approximate=self.gelu_approximation)
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.relu(h)
        return _project(h, self.down_t, self.down_b)


class FusedDecodeStep:
    """`model(next_ids, kv_cache=cache, positions=..., attn_mask=...)` for one token per row,
    through fused transposed weights. Returns logits `[B, vocab]`."""

    def __init__(self, model) -> None:
        self.model = model
        self.signature = weight_signature(model)
        self.layers = [FusedLayer(block) for block in model.layers]
        with torch.no_grad():
            self.head_t, self.head_b = _transposed(model.lm_head.weight), _joined_bias(model.lm_head)

    def __call__(self, next_ids: torch.Tensor, kv_cache, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        if next_ids.shape[1] != 1:
            raise ValueError(f"the fused decode step takes one token per row, got {next_ids.shape[1]}")
        if positions is None:
            positions = model.default_positions(next_ids, kv_cache)
        h = model.embed(next_ids, positions)[:, 0]  # [B, d_model]
        rope, mask = model.attention_inputs(positions, attn_mask, None, kv_cache)
        for layer in self.layers:
            h = layer(h, rope, mask, kv_cache)
        kv_cache.advance(1)
        return _project(model.norm(h), self.head_t, self.head_b)
