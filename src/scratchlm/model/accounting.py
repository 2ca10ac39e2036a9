"""Sizing a model from its config alone: parameters, FLOPs per token, MFU, and memory.

Everything here is arithmetic on a `ModelConfig` (no model is built), so the batch planner can
ask "does this fit, and how fast could it be?" for shapes far larger than this machine holds.
Conventions: FLOPs are the PaLM/nanoGPT ones, 6 per matmul parameter per trained token plus
12 * n_layer * n_head * head_dim * seq_len for attention (the causal half is not subtracted);
memory counts what autograd keeps for the backward pass, estimated per token and layer.
Not for measuring a running model (see the training loop's metrics) nor for choosing a plan.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from scratchlm.errors import UserError
from scratchlm.model.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}

# Dense (no sparsity) peak bf16/fp16 tensor throughput from the vendors' data sheets, FLOP/s.
PEAK_FLOPS = {
    "h100-sxm": 989e12,
    "h100": 989e12,
    "h100-pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "rtx4090": 165e12,
}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}") from None


# ---------------------------------------------------------------------------------------------
# Parameters


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(cfg: ModelConfig, dim: int) -> int:
    return dim * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def attention_params(cfg: ModelConfig) -> int:
    d_q, d_kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    n = _linear(cfg.d_model, d_q, cfg.bias) + 2 * _linear(cfg.d_model, d_kv, cfg.bias)
    n += _linear(d_q, cfg.d_model, cfg.bias)
    if cfg.qk_norm:
        n += 2 * cfg.head_dim
    return n


def mlp_params(cfg: ModelConfig) -> int:
    n_in = 2 if cfg.activation == "swiglu" else 1  # gate and up, or up only
    return n_in * _linear(cfg.d_model, cfg.d_ff, cfg.bias) + _linear(cfg.d_ff, cfg.d_model, cfg.bias)


def block_params(cfg: ModelConfig) -> int:
    return attention_params(cfg) + mlp_params(cfg) + 2 * _norm(cfg, cfg.d_model)


def embedding_lookup_params(cfg: ModelConfig) -> int:
    """Token and position tables, plus an untied output matrix: what "non-embedding" drops."""
    n = cfg.vocab_size * cfg.d_model
    if cfg.positions == "learned":
        n += cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    return n


def num_parameters(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Unique parameters of `Transformer(cfg)`, tied weights counted once."""
    final_norm = _norm(cfg, cfg.d_model) if cfg.norm_position == "pre" else 0
    n = cfg.n_layer * block_params(cfg) + final_norm
    return n if non_embedding else n + embedding_lookup_params(cfg)


def block_matmul_params(cfg: ModelConfig) -> int:
    """Linear weights of one block."""
    d_q, d_kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    attn = cfg.d_model * (2 * d_q + 2 * d_kv)
    mlp = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.d_ff
    return attn + mlp


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply activations per token: every Linear weight, the output head included."""
    return cfg.n_layer * block_matmul_params(cfg) + cfg.d_model * cfg.vocab_size


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of q k^T and probs v for one token attending over seq_len."""
    return 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * matmul parameters + the attention term (forward is 1/3)."""
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def mfu(cfg: ModelConfig, tokens_per_sec: float, peak_flops: float, seq_len: int | None = None) -> float:
    """Achieved training FLOP/s over the peak; seq_len defaults to the config's max_seq_len."""
    return tokens_per_sec * flops_per_token(cfg, seq_len or cfg.max_seq_len) / peak_flops


def peak_flops(name: str) -> float:
    """A stated peak by device name (e.g. "h100"), a number of FLOP/s given as a string, or
    "cpu" / "cpu-fp32": this machine's measured bf16 / fp32 matmul rate (takes about a second)."""
    try:
        return float(name)
    except ValueError:
        pass
    if name.lower() in ("cpu", "cpu-bf16", "cpu-fp32"):
        return measure_peak_flops("fp32" if name.lower() == "cpu-fp32" else "bf16")
    try:
        return PEAK_FLOPS[name.lower()]
    except KeyError:
        raise UserError(f"unknown device {name!r} for peak FLOP/s; known: {', '.join(PEAK_FLOPS)}") from None


def measure_peak_flops(dtype: str = "bf16", size: int = 1024, seconds: float = 1.0, device: str = "cpu") -> float:
    """Measured matmul FLOP/s on this machine: the "stated peak" for CPU MFU figures."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(size, size, dtype=torch_dtype, device=device)
    b = torch.randn(size, size, dtype=torch_dtype, device=device)
    a @ b  # warm-up: kernel selection and allocation
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2.0 * size**3 * n / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryEstimate:
    """Bytes needed to train at one batch shape; `total` is their sum."""

    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def optimizer_state_bytes(cfg: ModelConfig, optimizer: str, param_bytes: int) -> int:
    """AdamW keeps two moments per parameter; Muon one momentum for the block matrices (AdamW
    for the rest); SGD with momentum one."""
    n = num_parameters(cfg)
    if optimizer == "adamw":
        return 2 * n * param_bytes
    if optimizer == "sgd":
        return n * param_bytes
    if optimizer == "muon":
        matrices = matmul_params(cfg) - cfg.d_model * cfg.vocab_size
        return matrices * param_bytes + 2 * (n - matrices) * param_bytes
    raise UserError(f"unknown optimizer {optimizer!r}; expected adamw, muon or sgd")


MLP_SAVED_WIDTHS = {"relu": 1, "gelu": 2, "relu2": 2, "swiglu": 4}  # d_ff-wide tensors kept


def _norm_saved_bytes(cfg: ModelConfig, r: int) -> int:
    # LayerNorm keeps its input (plus mean/rstd); our fp32 RMSNorm also keeps the normalised copy
    return r * cfg.d_model * (2 if cfg.norm == "rmsnorm" else 1) + 8


def block_activation_bytes_per_token(cfg: ModelConfig, seq_len: int, compute_bytes: int, residual_bytes: int) -> float:
    """What one block saves for backward, per token (checked against autograd's saved tensors
    on torch 2.13 CPU in the tests): norm inputs in the residual dtype, matmul inputs and
    attention/MLP intermediates in the compute dtype."""
    a, r = compute_bytes, residual_bytes
    d, d_q, ff, H = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.d_ff, cfg.n_head
    d_kv = cfg.n_kv_head * cfg.head_dim
    attn = _norm_saved_bytes(cfg, r) + a * d  # norm, and its output cast once for q/k/v
    if cfg.attention_impl == "sdpa" and cfg.dropout > 0:
        # attention dropout leaves the fused kernel for the math path, which keeps q, k, v,
        # the probabilities before and after dropout and the dropout mask, all in fp32
        attn += 12 * d_q + 12 * H * seq_len + a * d_q
    elif cfg.attention_impl == "reference":
        # keys/values repeated per query head: a copy, except for MQA where it is a view
        copied = cfg.n_kv_head > 1 and cfg.n_kv_head < H
        attn += a * (d_q + 2 * (d_q if copied else d_kv)) + a * d_q  # q, k, v and the output
        attn += H * seq_len * (4 + (a if a != 4 else 0))  # fp32 softmax output, its cast
    else:
        attn += a * (d_q + 2 * d_kv)  # q, k, v: the kernel shares kv heads (enable_gqa)
        attn += a * d_q + 4 * H  # attention output (also o_proj's input) and its log-sum-exp
    if cfg.positions == "rope" and a != 4:
        attn += 4 * a * cfg.head_dim  # cos/sin cast to the compute dtype for queries and keys
    if cfg.qk_norm:
        # fp32 copies of the heads, their rsqrt and the normalised heads before the weight
        attn += (4 + a) * (d_q + d_kv) + 4 * (H + cfg.n_kv_head)
    mlp = _norm_saved_bytes(cfg, r) + a * d + a * ff * MLP_SAVED_WIDTHS[cfg.activation]
    dropout_masks = 2 * a * d if cfg.dropout > 0 else 0
    return attn + mlp + dropout_masks


def saved_activation_bytes(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    compute_dtype: str = "bf16",
    residual_dtype: str = "fp32",
    activation_checkpointing: bool = False,
) -> int:
    """Bytes autograd keeps from one micro-batch's forward until its backward.

    With checkpointing every block keeps only its input, and one block's activations exist at a
    time while it is recomputed. The loss is assumed to keep fp32 log-probabilities; under
    autocast the compute-dtype copies of the weights are kept too.
    """
    a, r = dtype_bytes(compute_dtype), dtype_bytes(residual_dtype)
    d = cfg.d_model
    per_block = block_activation_bytes_per_token(cfg, seq_len, a, r)
    if activation_checkpointing:
        blocks = cfg.n_layer * r * d + per_block
    else:
        blocks = cfg.n_layer * per_block
    embed = r * d if cfg.dropout > 0 else 0
    final_norm = _norm_saved_bytes(cfg, r) if cfg.norm_position == "pre" else 0
    head = final_norm + a * d + 4 * cfg.vocab_size
    if a == r:
        weight_copies = 0
    elif activation_checkpointing:  # block copies are rebuilt with the block; one at a time
        weight_copies = (cfg.d_model * cfg.vocab_size + block_matmul_params(cfg)) * a
    else:
        weight_copies = matmul_params(cfg) * a
    return int(batch_size * seq_len * (blocks + embed + head) + weight_copies)


def activation_bytes(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    compute_dtype: str = "bf16",
    residual_dtype: str = "fp32",
    activation_checkpointing: bool = False,
) -> int:
    """Peak activation memory: what is saved for backward plus the transient logits (in the
    compute dtype and an fp32 copy) while the loss is computed."""
    saved = saved_activation_bytes(cfg, batch_size, seq_len, compute_dtype, residual_dtype, activation_checkpointing)
    transient_logits = batch_size * seq_len * cfg.vocab_size * (dtype_bytes(compute_dtype) + 4)
    return saved + transient_logits


def memory_estimate(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    param_dtype: str = "fp32",
    compute_dtype: str = "bf16",
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    """Weights, gradients, optimizer state and activations for training at [batch_size, seq_len]."""
    p = dtype_bytes(param_dtype)
    n = num_parameters(cfg)
    return MemoryEstimate(
        weights=n * p,
        grads=n * p,
        optimizer=optimizer_state_bytes(cfg, optimizer, p),
        activations=activation_bytes(cfg, batch_size, seq_len, compute_dtype, param_dtype, activation_checkpointing),
    )
