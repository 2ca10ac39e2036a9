"""Losses for training, computed without materialising the full logits when that is faster.

`fused_linear_cross_entropy(h, weight, targets)` is the output projection and the mean
cross-entropy in one autograd function, evaluated over chunks of rows: each chunk's logits are
made, turned into the loss and the gradient (softmax - one-hot) at once, and dropped. The full
[tokens, vocab] logits (and their fp32 copy, log-softmax and its gradient) never exist, so the
memory traffic of the largest tensors of a small model's step stays in cache. Same result as
`F.cross_entropy(h @ weight.T, targets)` up to float rounding (tests hold it to that).
In bf16 on a CPU with the native kernels (`scratchlm.train.native`), each group of rows' loss
and gradient come from one C pass over its bf16 logits, in place, instead of five torch ops.
Not for anything that needs the logits themselves (generation, evaluation of choices).
"""

from __future__ import annotations

import threading

import torch

DEFAULT_CHUNK_ROWS = 256
CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MB in fp32, small enough to stay in cache


# Probabilities below this are too close to fp32's smallest normal number for -log(p) to be
# accurate (or finite); those rows take their loss from logsumexp instead.
_TINY_PROB = 1e-30


def _chunk_nll(logits, probs, targets, ok, all_valid: bool, acc_dtype) -> torch.Tensor:
    """Sum of -log softmax(logits)[target] over the chunk's valid rows, from the probabilities."""
    picked = probs.gather(1, targets[:, None]).squeeze(1)
    tiny = picked < _TINY_PROB
    nll = -torch.log(picked.clamp_min(_TINY_PROB))
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        exact = logits[rows].to(acc_dtype)
        lse = torch.logsumexp(exact, dim=-1)
        nll[rows] = lse - exact.gather(1, targets[rows, None]).squeeze(1)
    if not all_valid:
        nll = nll * ok
    return nll.sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, compute_dtype, ignore_index):
        if _native_applies(h, weight, compute_dtype):
            grad_h, grad_w, loss, ctx.grad_w_scale = _native_forward(ctx, h, weight, targets, compute_dtype,
                                                                     ignore_index)
            ctx.save_for_backward(grad_h, grad_w)
            return loss
        n = h.shape[0]
        w = weight.to(compute_dtype)
        hc = h.to(compute_dtype)
        valid = targets != ignore_index
        all_valid = bool(valid.all())
        count = max(1, int(valid.sum()))
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) if ctx.needs_input_grad[1] else None
        # the softmax runs in fp32 at least (bf16/fp16 logits are upcast, fp64 stays fp64)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=h.device)
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            t = targets[start:stop]
            ok = valid[start:stop]
            safe_t = t if all_valid else torch.where(ok, t, torch.zeros_like(t))
            logits = hc[start:stop] @ w.T
            # one fused pass gives the probabilities, which are both the loss (-log p[target])
            # and, less the one-hot, the gradient; a logsumexp first would read the logits twice
            probs = torch.softmax(logits, dim=-1, dtype=acc_dtype)
            total += _chunk_nll(logits, probs, safe_t, ok, all_valid, acc_dtype)
            if need_grad:
                # d(sum loss)/d(logits) = softmax - onehot, zero on ignored rows; the 1/count of
                # the mean is applied to the (much smaller) products below, not to this tensor
                probs[torch.arange(stop - start, device=h.device), safe_t] -= 1.0
                if not all_valid:
                    probs *= ok.to(probs.dtype)[:, None]
                g = probs.to(compute_dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (g @ w).to(h.dtype).div_(count)
                if grad_w is not None:
                    grad_w += (g.T @ hc[start:stop]).to(grad_w.dtype)
        if grad_w is not None:
            grad_w = grad_w.div_(count).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.grad_w_scale = 1.0
        return (total / count).to(torch.promote_types(h.dtype, acc_dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # Both were made by forward for this backward alone: scaled in place, no new [vocab, d]
        # tensor (a second backward through the same graph is refused by torch's version check).
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out.to(grad_w.dtype) * ctx.grad_w_scale) if grad_w is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_rows: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` ([N, d], [V, d], [N]).

    Targets equal to `ignore_index` count for nothing (as in `F.cross_entropy`). Under autocast
    the matmuls run in the autocast dtype and the softmax in fp32, as the unfused path does.
    """
    if chunk_rows is None:
        chunk_rows = max(32, min(4096, CHUNK_ELEMENTS // weight.shape[0]))
    if torch.is_autocast_enabled(h.device.type):
        compute_dtype = torch.get_autocast_dtype(h.device.type)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    with torch.autocast(h.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(h, weight, targets, chunk_rows, compute_dtype, ignore_index)


# ---------------------------------------------------------------------------------------------
# The bf16 CPU path through the C kernel (scratchlm.train.native)

# Rows of logits per group on the native path: the kernel turns each group's bf16 logits into
# the bf16 gradient in place, so a group of [1024, V] bf16 is 16 MB at V = 8192, and the
# weight's gradient is one GEMM per group (fewer fp32 accumulations of the [V, d] product).
NATIVE_GROUP_ELEMENTS = 1 << 23


_THREAD_BUFFERS = threading.local()


def _logits_buffer(rows: int, vocab: int) -> torch.Tensor:
    """A [rows, vocab] bf16 buffer kept per thread across calls: the logits GEMM writing into
    the same warm 16 MB each time measured 203 GFLOP/s against 161 into a fresh tensor (one
    core, Zen 4, inside a training step); the group never outlives the call."""
    buffer = getattr(_THREAD_BUFFERS, "logits", None)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab:
        buffer = _THREAD_BUFFERS.logits = torch.empty(rows, vocab, dtype=torch.bfloat16)
    return buffer[:rows]


def _native_applies(h, weight, compute_dtype) -> bool:
    if compute_dtype != torch.bfloat16 or h.device.type != "cpu" or weight.device.type != "cpu":
        return False
    from scratchlm.train import native

    return native.library() is not None


def _native_forward(ctx, h, weight, targets, compute_dtype, ignore_index):
    """Mean cross-entropy and the gradients of h and weight, group by group of rows: logits by
    one GEMM, loss and (softmax - one-hot) by the C kernel in one pass, two GEMMs back."""
    from scratchlm.train.native import add_bf16_to_f32_, cross_entropy_rows_

    n, vocab = h.shape[0], weight.shape[0]
    w = weight.to(compute_dtype)
    hc = h.to(compute_dtype)
    valid = targets != ignore_index
    count = max(1, int(valid.sum()))
    kernel_targets = torch.where(valid, targets, torch.full_like(targets, -1))
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = None
    total = torch.zeros((), dtype=torch.float64)
    group = max(1, NATIVE_GROUP_ELEMENTS // vocab)
    for start in range(0, n, group):
        stop = min(n, start + group)
        g = torch.mm(hc[start:stop], w.T, out=_logits_buffer(stop - start, vocab))
        total += cross_entropy_rows_(g, kernel_targets[start:stop]).sum(dtype=torch.float64)
        if grad_h is not None:  # the 1/count of the mean goes on the small products
            grad_h[start:stop] = (g @ w).to(h.dtype).div_(count)
        if need_w:  # fp32 accumulation across groups, the cast and the add in one pass
            product = g.T @ hc[start:stop]
            grad_w = product.float() if grad_w is None else add_bf16_to_f32_(grad_w, product)
    if grad_w is not None:  # the 1/count of the mean is applied by backward, with its grad_out
        grad_w = grad_w.to(weight.dtype)
    loss = (total / count).to(torch.promote_types(h.dtype, torch.float32))
    return grad_h, grad_w, loss, 1.0 / count
