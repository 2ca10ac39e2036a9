"""The Transformer's building blocks: norms, position encodings, attention and feed-forward layers.

Numerics follow the reference implementations exactly, because other stages export these weights
to Hugging Face GPT2LMHeadModel / LlamaForCausalLM and compare logits: RMSNorm in fp32 with the
weight applied after casting back, RoPE in HF Llama's rotate-half layout, attention scaled by
1/sqrt(head_dim), GELU with the tanh approximation for GPT-2. Every projection is an `nn.Linear`
called as a module so LoRA or quantized layers can be swapped in from outside.
Not for assembling the model (see `transformer.py`) nor for caching (see `kv_cache.py`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as LLaMA does: bf16 squares lose too much)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


# ---------------------------------------------------------------------------------------------
# Positions. Both tables are computed from the positions on the fly in fp32: no buffers that a
# dtype cast could round, any position works, and it is a handful of flops per token.


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, 1, T, head_dim] (fp32) for the rotate-half RoPE layout of HF Llama."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # first half and second half share frequencies
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, head_dim] queries or keys by their positions (cos/sin cast as HF does)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def sinusoidal_embeddings(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...): [B, T, d]."""
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    angles = positions.float()[..., None] / (10000.0**exponents)  # [B, T, d/2]
    # interleave sin and cos so even features are sines and odd features cosines
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Mixed precision


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """Cast once to the autocast dtype before feeding several projections.

    Autocast casts every matmul input by itself, so q/k/v (or gate/up) would each make their
    own bf16 copy of the same fp32 activation, costing time and saved-for-backward memory.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


# ---------------------------------------------------------------------------------------------
# Attention


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv_head, S, D] -> [B, n_kv_head * n_rep, S, D]; query head h uses kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, D).reshape(B, H * n_rep, S, D)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out, the plain path SDPA is tested against.

    `mask` is bool [B or 1, 1, T, S], True = may attend; None means causal with the queries
    being the last T of the S keys (the same as SDPA's is_causal when T == S).
    """
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    impl: str = "sdpa",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention over [B, H, T, D] queries and [B, H_kv, S, D] keys/values."""
    n_rep = q.shape[1] // k.shape[1]
    if impl == "reference":
        return reference_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout_p)
    # Without a mask the queries are the whole sequence (training, prefill) or one new token
    # that may see everything cached; only the first needs the causal flag (fast kernel path).
    is_causal = mask is None and q.shape[-2] == k.shape[-2] and q.shape[-2] > 1
    if is_causal and dropout_p == 0.0 and use_bmm_causal_attention(q):
        fast = _TRAINING_KERNELS["causal_attention"]
        if fast is not None and fast.applies(q, k):  # GQA inside: no repeated keys/values
            return fast(q, k, v)
        return causal_attention_bmm(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))
    # enable_gqa lets the kernel share each key/value head without materialising the copies
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=n_rep > 1
    )


# A plain global rather than a ContextVar: torch.compile traces a global (and guards on it),
# but not ContextVar.get. Training runs its forward on one thread, which is all this needs.
_BMM_ATTENTION = {"enabled": False}


@contextlib.contextmanager
def bmm_causal_attention(enabled: bool = True):
    """Within this context, causal attention that needs gradients runs as two batched GEMMs
    around a softmax when the inputs are bf16/fp16 on a CPU (the CPU trainer turns it on).

    There it is about twice as fast as SDPA's CPU flash kernel (forward + backward, measured
    at T=256, head_dim 64), whose backward dominates a small model's attention time. It keeps
    the [heads, T, T] probabilities for backward where the flash kernel keeps a log-sum-exp,
    which is why it is opt-in rather than the default (memory estimates assume SDPA)."""
    previous = _BMM_ATTENTION["enabled"]
    _BMM_ATTENTION["enabled"] = enabled
    try:
        yield
    finally:
        _BMM_ATTENTION["enabled"] = previous


def use_bmm_causal_attention(q: torch.Tensor) -> bool:
    return (_BMM_ATTENTION["enabled"] and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.requires_grad and torch.is_grad_enabled())


# Kernels a trainer may plug in for bf16 training steps on a CPU (scratchlm.train.native):
# "gelu_tanh"(x), "causal_softmax"(scores, scale) and "causal_attention"(q, k, v) (with an
# `applies(q, k)` test). None = torch's own ops. They are used only where the bmm attention is
# (grad-enabled bf16 on a CPU), never for inference or exports.
_TRAINING_KERNELS = {"gelu_tanh": None, "causal_softmax": None, "causal_attention": None}


@contextlib.contextmanager
def training_kernels(gelu_tanh=None, causal_softmax=None, causal_attention=None):
    """Within this context, tanh-GELU and the causal attention (whole, or the bmm path's softmax)
    of bf16 CPU tensors that need gradients run through the given functions (same maths,
    faster kernels)."""
    previous = dict(_TRAINING_KERNELS)
    _TRAINING_KERNELS.update(gelu_tanh=gelu_tanh, causal_softmax=causal_softmax,
                             causal_attention=causal_attention)
    try:
        yield
    finally:
        _TRAINING_KERNELS.update(previous)


def gelu(x: torch.Tensor, approximation: str) -> torch.Tensor:
    """F.gelu, or the plugged-in tanh-GELU kernel for a bf16 CPU training step."""
    fast = _TRAINING_KERNELS["gelu_tanh"]
    if (fast is not None and approximation == "tanh" and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.requires_grad and torch.is_grad_enabled()):
        return fast(x)
    return F.gelu(x, approximate=approximation)


_CAUSAL_BIAS_CACHE: dict[tuple, torch.Tensor] = {}


def _causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, T, T] of 0 on and below the diagonal, -inf above: added to the scores by baddbmm."""
    key = (T, dtype, str(device))
    bias = _CAUSAL_BIAS_CACHE.get(key)
    if bias is None:
        upper = torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)
        bias = torch.zeros(T, T, dtype=dtype, device=device).masked_fill(upper, float("-inf"))[None]
        _CAUSAL_BIAS_CACHE.clear()  # one shape at a time in practice; never grow without bound
        _CAUSAL_BIAS_CACHE[key] = bias
    return bias


def causal_attention_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal) v for [B, H, T, D] with equal head counts.

    baddbmm folds the scale and the causal mask into the score GEMM, so the only elementwise
    pass over the [B*H, T, T] scores is the softmax (fp32 accumulation inside the kernel).
    """
    B, H, T, D = q.shape
    q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
    fast_softmax = _TRAINING_KERNELS["causal_softmax"]
    if fast_softmax is not None and q.dtype == torch.bfloat16:  # scale and mask inside the kernel
        return torch.bmm(fast_softmax(torch.bmm(q3, k3.transpose(1, 2)), D**-0.5), v3).view(B, H, T, D)
    scores = torch.baddbmm(_causal_bias(T, q.dtype, q.device), q3, k3.transpose(1, 2), alpha=D**-0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v3).view(B, H, T, D)


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v projections, GQA/MQA, optional QK-norm and RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache this layer writes
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.impl = config.attention_impl
        self.dropout = config.dropout
        d_q, d_kv = config.n_head * self.head_dim, config.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.d_model, d_q, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, d_kv, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, d_kv, bias=config.bias)
        self.o_proj = nn.Linear(d_q, config.d_model, bias=config.bias)
        if config.qk_norm:  # per-head RMSNorm on queries and keys (as Qwen3 / OLMo-2 style models)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope=None, mask=None, kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        x = to_autocast_dtype(x)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, self.impl, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


# ---------------------------------------------------------------------------------------------
# Feed-forward


class MLP(nn.Module):
    """Position-wise feed-forward: down(act(up(x))), or down(silu(gate(x)) * up(x)) for SwiGLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        self.gelu_approximation = config.gelu_approximation
        if config.activation == "swiglu":
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        else:
            self.gate_proj = None
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            x = to_autocast_dtype(x)
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        if self.activation == "gelu":
            h = gelu(h, self.gelu_approximation)
        elif self.activation == "relu2":
            h = F.relu(h).square()  # ReLU² (So et al., Primer)
        else:
            h = F.relu(h)
        return self.down_proj(h)
