"""Faster one-token decode steps for a plain Transformer than its own forward.

Decoding one token per row is a chain of matrix-vector products whose cost is reading the
weights, plus many small ops per layer. Two steps here run `Transformer.forward` for one new
token per row; embedding, positions, RoPE tables and masks are the model's own code in both:

- `NativeDecodeStep` (the default where `scratchlm.infer.native` can build its C kernels): every
  projection and the head read from packed copies of the weights (panels of 32 output columns,
  each a sequential stream) once per step for up to 8 rows, so memory bandwidth, not the kernel,
  sets the speed at batch 1 and batch 8 alike; norms, RoPE with the cache write, attention over
  the cache and SiLU gating are one C call each. Any number of rows; fp32; no QK-norm.
- `FusedDecodeStep` (the torch fallback): q/k/v and gate/up fused into one matrix each and every
  projection stored transposed-contiguous (`x @ Wt`), which reads weights ~25% faster than
  `F.linear` at batch 1 but not at batch 8 (see FUSED_MAX_ROWS).

Both equal the model's forward up to float rounding order. The copies cost one extra set of block
and head weights in memory; `fused_step_for(model)` builds them lazily, keeps them with the model,
and rebuilds them if any source weight changes. Models they cannot mirror exactly (LoRA or
quantized layers swapped in, post-norm blocks, autocast, training mode) get None and decode
through the model itself.
Not for prefill or training (the model's own forward does those), nor a change to the model's
parameters, names or state dict: LoRA, quantization and export never see these copies.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model.layers import RMSNorm, apply_rope, attend, rope_cos_sin

# Batch sizes up to which the fused step is the faster path. Measured on the 2-core Zen 4 box
# (docs/benchmarks.md, Inference): 1.30x less CPU per token at one row, but 0.92x (slower) at 8
# rows, where MKL's small-M GEMM on `F.linear`'s layout beats `x @ Wt`.
FUSED_MAX_ROWS = 1

_STEPS: "weakref.WeakKeyDictionary[nn.Module, FusedDecodeStep]" = weakref.WeakKeyDictionary()


def fused_step_for(model, native: bool = True) -> "FusedDecodeStep | NativeDecodeStep | None":
    """The model's fast decode step (built on first use, rebuilt when its weights change): the
    C kernels' `NativeDecodeStep` where they can run it (and `native`), else the torch
    `FusedDecodeStep`, or None when the model is not one these steps mirror exactly."""
    if not supports(model):
        return None
    kind = NativeDecodeStep if native and supports_native(model) else FusedDecodeStep
    step = _STEPS.get(model)
    if type(step) is not kind or step.signature != weight_signature(model):
        step = kind(model)
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
    """Identity and version of every parameter: changes when any is replaced or updated (the
    steps keep copies of projections, and the native step of bf16 norm weights too)."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


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


class _StepOfModel:
    """A step refers to its model weakly: `_STEPS` is keyed weakly by the model, and a strong
    reference from the value would keep every model (and its weight copies) alive forever."""

    def _keep_model(self, model) -> None:
        self._model_ref = weakref.ref(model)

    @property
    def model(self):
        return self._model_ref()


class FusedDecodeStep(_StepOfModel):
    """`model(next_ids, kv_cache=cache, positions=..., attn_mask=...)` for one token per row,
    through fused transposed weights. Returns logits `[B, vocab]`."""

    max_rows = FUSED_MAX_ROWS  # larger batches are faster through the model's own forward

    def __init__(self, model) -> None:
        self._keep_model(model)
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


# ---- the native step: C kernels over packed weights ---------------------------------------------


NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def supports_native(model) -> bool:
    """True where the C kernels can run the whole step: CPU weights all fp32 or all bf16 (bf16
    with RMSNorm only), no QK-norm, and the library built (see `scratchlm.infer.native`)."""
    from scratchlm.infer import native

    if not supports(model) or native.library() is None:
        return False
    if any(block.attn.q_norm is not None for block in model.layers):
        return False
    dtype = model.lm_head.weight.dtype
    tensors = [lin.weight for lin in _source_linears(model)] + [model.tok_embeddings.weight]
    if dtype not in NATIVE_DTYPES or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return False
    norms = [model.norm] + [n for block in model.layers for n in (block.attn_norm, block.mlp_norm)]
    return dtype == torch.float32 or all(isinstance(n, RMSNorm) for n in norms)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp32 contiguous view of `t` when it is one already (so in-place updates show), else a copy."""
    return None if t is None else t.detach().float().contiguous()


def _weight_groups(model) -> list[tuple[nn.Linear, ...]]:
    """The matrices the native step packs, in the order it reads them: per block q|k|v, o,
    gate|up (or up), down; then the head."""
    groups = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        ins = (mlp.gate_proj, mlp.up_proj) if mlp.gate_proj is not None else (mlp.up_proj,)
        groups += [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), ins, (mlp.down_proj,)]
    return groups + [(model.lm_head,)]


class PackedWeights:
    """Packed copies of a model's projection weights (`native.pack_weight` layout), side by side
    in one buffer that the OS is asked to back with huge pages: a decode step streams all of it,
    and on 4 KiB pages the TLB misses alone halved the bandwidth measured here."""

    def __init__(self, model) -> None:
        from scratchlm.infer import native

        groups = _weight_groups(model)
        shapes = [(sum(lin.out_features for lin in g), g[0].in_features) for g in groups]
        self.dtype = model.lm_head.weight.dtype  # fp32 or bf16, as the model's weights
        self.buffer = native.huge_page_buffer(sum(native.packed_numel(*shape) for shape in shapes), self.dtype)
        self.matrices: dict[tuple[int, ...], torch.Tensor] = {}
        used = 0
        with torch.no_grad():
            for group, shape in zip(groups, shapes):
                n = native.packed_numel(*shape)
                weight = torch.cat([lin.weight.detach() for lin in group], dim=0)
                self.matrices[tuple(id(lin) for lin in group)] = native.pack_weight(weight, self.buffer[used:used + n])
                used += n

    def get(self, *linears: nn.Linear) -> torch.Tensor:
        return self.matrices[tuple(id(lin) for lin in linears)]


class Workspace:
    """Preallocated activations for up to `rows` rows (a step of B rows uses the first B)."""

    def __init__(self, model, rows: int, max_len: int) -> None:
        cfg = model.config
        d_q, d_kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        d_in = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff
        self.rows, self.max_len = rows, max_len

        def buffer(width: int) -> torch.Tensor:
            return torch.zeros(rows, width, dtype=torch.float32)

        self.x, self.normed = buffer(cfg.d_model), buffer(cfg.d_model)  # residual stream, its norm
        self.qkv, self.q, self.attn = buffer(d_q + 2 * d_kv), buffer(d_q), buffer(d_q)
        self.hidden, self.act = buffer(d_in), buffer(cfg.d_ff)
        self.scores = torch.zeros(max_len, dtype=torch.float32)
        for name in ("x", "normed", "qkv", "q", "attn", "hidden", "act", "scores"):
            setattr(self, f"{name}_p", getattr(self, name).data_ptr())


class NativeLayer:
    """One pre-norm block through the C kernels; its projections packed (q/k/v and gate/up
    each as one matrix), norms and activations as the block's own modules define them."""

    def __init__(self, block, packed: PackedWeights) -> None:
        attn, mlp = block.attn, block.mlp
        ins = (mlp.gate_proj, mlp.up_proj) if mlp.gate_proj is not None else (mlp.up_proj,)
        self.qkv = packed.get(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o, self.inp, self.down = packed.get(attn.o_proj), packed.get(*ins), packed.get(mlp.down_proj)
        with torch.no_grad():
            self.qkv_b = _fp32(_joined_bias(attn.q_proj, attn.k_proj, attn.v_proj))
            self.o_b, self.inp_b = _fp32(_joined_bias(attn.o_proj)), _fp32(_joined_bias(*ins))
            self.down_b = _fp32(_joined_bias(mlp.down_proj))
        self.attn_norm_w, self.mlp_norm_w = _norm_weight(block.attn_norm), _norm_weight(block.mlp_norm)
        self.bf16 = packed.dtype == torch.bfloat16
        self.attn_norm, self.mlp_norm = block.attn_norm, block.mlp_norm
        self.layer_idx = attn.layer_idx
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        self.d_model, self.d_ff = attn.o_proj.out_features, mlp.down_proj.in_features
        self.d_in = self.inp_b.numel() if self.inp_b is not None else sum(m.out_features for m in ins)
        self.gated = mlp.gate_proj is not None
        self.activation, self.gelu_approximation = mlp.activation, mlp.gelu_approximation

    def __call__(self, lib, ws: Workspace, B: int, rope, mask, kv_cache) -> None:
        """Updates the residual stream `ws.x[:B]` in place and writes this token's key/value."""
        H, Hkv, D, d = self.n_head, self.n_kv_head, self.head_dim, self.d_model
        width = (H + 2 * Hkv) * D
        keys, values = kv_cache.keys[self.layer_idx], kv_cache.values[self.layer_idx]
        S, pos = kv_cache.max_len, kv_cache.length
        linear = lib.linear_packed_bf16 if self.bf16 else lib.linear_packed_f32
        _norm(lib, self.attn_norm, self.attn_norm_w, ws, B)
        linear(ws.normed_p, B, d, self.qkv.data_ptr(), width, _ptr(self.qkv_b),
                              ws.qkv_p, width, 0)
        cos_p, sin_p, positions_p = rope
        lib.qkv_to_cache_f32(ws.qkv_p, B, H, Hkv, D, cos_p, sin_p, positions_p, ws.q_p,
                             keys.data_ptr(), values.data_ptr(), S, pos)
        mask_p, mask_stride = mask[:2] if mask is not None else (None, 0)
        lib.attend_decode_f32(ws.q_p, keys.data_ptr(), values.data_ptr(), B, H, Hkv, D, S, pos + 1,
                              mask_p, mask_stride, D ** -0.5, ws.attn_p, ws.scores_p)
        # the residual connections are folded into the output projections (accumulate=1)
        linear(ws.attn_p, B, H * D, self.o.data_ptr(), d, _ptr(self.o_b), ws.x_p, d, 1)
        _norm(lib, self.mlp_norm, self.mlp_norm_w, ws, B)
        linear(ws.normed_p, B, d, self.inp.data_ptr(), self.d_in, _ptr(self.inp_b),
                              ws.hidden_p, self.d_in, 0)
        self._activate(lib, ws, B)
        linear(ws.act_p, B, self.d_ff, self.down.data_ptr(), d, _ptr(self.down_b),
                              ws.x_p, d, 1)

    def _activate(self, lib, ws: Workspace, B: int) -> None:
        """ws.act[:B] = the MLP's activation of ws.hidden[:B] (SiLU gating in C, others in torch)."""
        if self.gated:
            lib.silu_mul_f32(ws.hidden_p, B, self.d_ff, ws.act_p)
            return
        h = ws.hidden[:B]
        if self.activation == "gelu":
            ws.act[:B] = F.gelu(h, approximate=self.gelu_approximation)
        elif self.activation == "relu2":
            ws.act[:B] = F.relu(h).square()
        else:
            ws.act[:B] = F.relu(h)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _norm_weight(norm: nn.Module) -> torch.Tensor | None:
    """An RMSNorm's weight as fp32 for the C kernel (None: the norm runs through torch)."""
    return _fp32(norm.weight) if isinstance(norm, RMSNorm) else None


def _norm(lib, norm: nn.Module, weight32: torch.Tensor | None, ws: Workspace, B: int) -> None:
    """ws.normed[:B] = norm(ws.x[:B]): RMSNorm in C, anything else (LayerNorm) through torch."""
    if weight32 is not None:
        lib.rmsnorm_f32(ws.x_p, B, ws.x.shape[1], weight32.data_ptr(), norm.eps, ws.normed_p)
    else:
        ws.normed[:B] = norm(ws.x[:B])


class NativeDecodeStep(_StepOfModel):
    """`model(next_ids, kv_cache=cache, positions=..., attn_mask=...)` for one token per row
    through the C kernels, for any number of rows. Returns logits `[B, vocab]`.

    The blocks and the head run in C over packed copies of the weights, which are read from
    memory once per step for up to 8 rows, so a batch costs about what one row does. RoPE reads
    tables the model's own `rope_cos_sin` computed once for every position; a plain token
    embedding is a C row copy, any other (learned/sinusoidal positions, scaling) and the padding
    mask are the model's own code. Small torch ops are avoided on purpose: after each step has
    streamed ~100 MB of weights through the caches, every torch op starts cold (tens of µs)."""

    max_rows = None  # any batch size

    def __init__(self, model) -> None:
        from scratchlm.infer import native

        self._keep_model(model)
        self.lib = native.library()
        self.signature = weight_signature(model)
        self.packed = PackedWeights(model)
        self.layers = [NativeLayer(block, self.packed) for block in model.layers]
        self.head = self.packed.get(model.lm_head)
        with torch.no_grad():
            self.head_b = _fp32(_joined_bias(model.lm_head))
        cfg = model.config
        self.final_norm, self.final_norm_w = model.norm, _norm_weight(model.norm)
        self.vocab_size, self.d_model = model.lm_head.out_features, cfg.d_model
        self.rope = cfg.positions == "rope"
        self.plain_embedding = (cfg.positions not in ("learned", "sinusoidal") and not cfg.scale_embeddings
                                and model.tok_embeddings.weight.dtype == torch.float32)
        self.embedding = model.tok_embeddings.weight.detach().contiguous()
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.workspace: Workspace | None = None
        self.lock = threading.Lock()

    def __call__(self, next_ids: torch.Tensor, kv_cache, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_step(next_ids, kv_cache)
        with self.lock:  # one workspace per step: threads decoding the same model take turns
            return self._step(next_ids, kv_cache, positions, attn_mask)

    def _step(self, next_ids, kv_cache, positions, attn_mask) -> torch.Tensor:
        lib, B = self.lib, next_ids.shape[0]
        ws = self._workspace(B, kv_cache.max_len)
        row_positions = None if positions is None else positions.reshape(B).contiguous()
        self._embed(next_ids, positions, kv_cache, ws)
        rope = self._rope_pointers(kv_cache.length, row_positions)
        mask_p = self._mask_pointer(B, positions, attn_mask, kv_cache)
        for layer in self.layers:
            layer(lib, ws, B, rope, mask_p, kv_cache)
        kv_cache.advance(1)
        _norm(lib, self.final_norm, self.final_norm_w, ws, B)
        logits = torch.empty(B, self.vocab_size, dtype=torch.float32)
        linear = lib.linear_packed_bf16 if self.packed.dtype == torch.bfloat16 else lib.linear_packed_f32
        linear(ws.normed_p, B, self.d_model, self.head.data_ptr(), self.vocab_size,
                              _ptr(self.head_b), logits.data_ptr(), self.vocab_size, 0)
        return logits

    def _embed(self, next_ids, positions, kv_cache, ws: Workspace) -> None:
        """ws.x[:B] = the model's embedding of the new tokens."""
        B = next_ids.shape[0]
        if not self.plain_embedding:
            if positions is None:
                positions = self.model.default_positions(next_ids, kv_cache)
            ws.x[:B] = self.model.embed(next_ids, positions)[:, 0]
            return
        ids = next_ids.reshape(B).contiguous()
        bad = self.lib.embed_rows_f32(self.embedding.data_ptr(), self.embedding.shape[0], ids.data_ptr(),
                                      B, self.d_model, ws.x_p)
        if bad >= 0:
            raise IndexError(f"token id {int(ids[bad])} is out of range for a vocabulary of "
                             f"{self.embedding.shape[0]}")

    def _rope_pointers(self, slot: int, row_positions: torch.Tensor | None) -> tuple:
        """(cos table, sin table, per-row positions or None = the cache slot) for the kernels."""
        if not self.rope:
            return None, None, None
        largest = slot
        if row_positions is not None:
            if int(row_positions.min()) < 0:
                raise ValueError("positions must be >= 0 for RoPE")
            largest = max(slot, int(row_positions.max()))
        cos, sin = self._tables(largest + 1)
        return cos.data_ptr(), sin.data_ptr(), _ptr(row_positions)

    def _tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [P, head_dim] for positions 0..P-1 (P >= n), from the model's own
        `rope_cos_sin` (elementwise, so each row equals what a one-position call gives)."""
        if self.rope_tables is None or self.rope_tables[0].shape[0] < n:
            cfg = self.model.config
            size = max(n, cfg.max_seq_len, 2 * (0 if self.rope_tables is None else self.rope_tables[0].shape[0]))
            cos, sin = rope_cos_sin(torch.arange(size).unsqueeze(0), cfg.head_dim, cfg.rope_theta)
            self.rope_tables = (cos.reshape(size, -1).contiguous(), sin.reshape(size, -1).contiguous())
        return self.rope_tables

    def _mask_pointer(self, B: int, positions, attn_mask, kv_cache):
        """(bytes [B, L], row stride) of the model's mask for this step, or None (see all)."""
        if attn_mask is None:
            return None
        if positions is None:
            positions = self.model.default_positions(torch.empty(B, 1), kv_cache)
        _, mask = self.model.attention_inputs(positions, attn_mask, None, kv_cache)
        mask = mask.reshape(mask.shape[0], -1).expand(B, -1).contiguous()
        return mask.data_ptr(), mask.shape[1], mask

    def _workspace(self, rows: int, max_len: int) -> Workspace:
        ws = self.workspace
        if ws is None or ws.rows < rows or ws.max_len < max_len:
            ws = self.workspace = Workspace(self.model, rows, max_len)
        return ws


def _check_step(next_ids: torch.Tensor, kv_cache) -> None:
    """The checks `KVCache.update` would make, plus the layout the kernels assume."""
    B, T = next_ids.shape
    if T != 1:
        raise ValueError(f"the native decode step takes one token per row, got {T}")
    if kv_cache.length + 1 > kv_cache.max_len:
        raise ValueError(f"KV cache full: {kv_cache.length} + 1 positions exceed max_len {kv_cache.max_len}")
    if B > kv_cache.batch_size:
        raise ValueError(f"batch of {B} does not fit a KV cache made for {kv_cache.batch_size}")
    buffers = kv_cache.keys + kv_cache.values
    if any(b.dtype != torch.float32 or b.device.type != "cpu" or not b.is_contiguous() for b in buffers):
        raise ValueError("the native decode step needs contiguous fp32 CPU KV cache buffers")
