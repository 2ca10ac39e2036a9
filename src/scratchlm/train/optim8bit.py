"""AdamW with 8-bit, block-wise quantized moments (`train.optimizer=adamw8bit`), written here.

Adam keeps two fp32 moments per parameter: 8 bytes, twice the weights themselves. Here each
moment is stored as one byte per value plus one fp32 scale per block of `block_size` values
(Dettmers et al. 2022, "8-bit optimizers via block-wise quantization"), about 2.03 bytes for
both moments, so the state is ~3.9x smaller. Each step dequantizes one parameter's moments to
fp32, does the ordinary AdamW update, and quantizes them back; only one tensor's fp32 moments
exist at a time.

Quantization: values are divided by their block's absolute maximum and stored on a
square-root grid (the first moment signed in int8, the second moment as uint8 on the
square root of its square root), which puts most code points near zero where Adam's moments
live; a plain linear grid rounds the many small second moments to zero and blows up updates.
Small tensors (norm gains, biases: fewer than `min_8bit_size` values) keep fp32 moments, as
bitsandbytes does: they cost nothing and are the most sensitive.

Not for bitsandbytes interop, nor for quantizing weights (see `scratchlm.model.quant`).
"""

from __future__ import annotations

import math

import torch

from scratchlm.train.optim import Optimizer

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


# ---------------------------------------------------------------------------------------------
# Block-wise codes


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks: [n_blocks, block_size] (fp32)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_signed(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (int8 codes, fp32 per-block absmax); code = round(127 * sign * sqrt(|x| / absmax))."""
    blocks = _blocks(x, block_size)
    scale = blocks.abs().amax(dim=1).clamp_min(1e-30)
    normalised = blocks / scale[:, None]
    codes = torch.round(127.0 * normalised.sign() * normalised.abs().sqrt()).to(torch.int8)
    return codes.view(-1), scale


def dequantize_signed(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    y = codes.view(scale.numel(), -1).float() / 127.0
    x = y * y.abs() * scale[:, None]
    return x.view(-1)[: like.numel()].view_as(like)


def quantize_unsigned(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative fp32 (Adam's second moment) -> (uint8 codes, per-block max).

    The code is 255 * (x / max) ** 0.25: the second moment spans many orders of magnitude and
    its small values set the largest updates, so they need the finest steps.
    """
    blocks = _blocks(x, block_size).clamp_min(0.0)
    scale = blocks.amax(dim=1).clamp_min(1e-30)
    codes = torch.round(255.0 * (blocks / scale[:, None]).sqrt().sqrt()).to(torch.uint8)
    return codes.view(-1), scale


def dequantize_unsigned(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    y = codes.view(scale.numel(), -1).float() / 255.0
    y = y * y
    x = y * y * scale[:, None]
    return x.view(-1)[: like.numel()].view_as(like)


# ---------------------------------------------------------------------------------------------
# The optimizer


class AdamW8bit(Optimizer):
    """AdamW (decoupled weight decay, bias correction) with 8-bit block-wise moments."""

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, kind="adamw8bit",
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[p]
        quantized = p.numel() >= group["min_8bit_size"]
        if "step" not in state:
            state["step"] = 0
            if quantized:
                zeros = torch.zeros_like(p, dtype=torch.float32)
                state["m_codes"], state["m_scale"] = quantize_signed(zeros, group["block_size"])
                state["v_codes"], state["v_scale"] = quantize_unsigned(zeros, group["block_size"])
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        step = state["step"]
        grad = p.grad.float()
        if quantized:
            m = dequantize_signed(state["m_codes"], state["m_scale"], p)
            v = dequantize_unsigned(state["v_codes"], state["v_scale"], p)
        else:
            m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if wd:
            p.mul_(1.0 - lr * wd)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1.0 - beta1**step))
        if quantized:
            state["m_codes"], state["m_scale"] = quantize_signed(m, group["block_size"])
            state["v_codes"], state["v_scale"] = quantize_unsigned(v, group["block_size"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # the base class casts floating tensors to the parameter's dtype; scales stay fp32
        for state in self.state.values():
            for key in ("m_scale", "v_scale", "exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].float()


def state_bytes(optimizer) -> int:
    """Bytes held in an optimizer's tensor state (moments, codes, scales)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
