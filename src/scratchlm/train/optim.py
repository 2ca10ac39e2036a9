"""Optimizers for training, written here: AdamW with decay / no-decay groups, and Muon.

- `AdamW` (Loshchilov & Hutter): Adam moments with decoupled weight decay, updated with torch's
  multi-tensor `_foreach` kernels so it is as fast as the library's, or on a CPU in fp32 by one C
  pass per parameter (`scratchlm.train.native`), faster still; weight decay only on matrices.
- `Muon` (Jordan et al., the modded-nanogpt speedrun): momentum whose update is orthogonalised by a
  Newton-Schulz iteration, for the 2-D weight matrices inside the blocks. Embeddings, the output
  head, norms and biases are not matrices in that sense and get AdamW in the same optimizer.

Every group carries `initial_lr` (its peak); the trainer multiplies it by the schedule's factor.
State is plain tensors plus ints so a checkpoint can keep tensors in safetensors and the rest in
JSON. Not for the schedule (`schedule.py`) or for 8-bit state (a later, separate optimizer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, norm gains (anything 1-D) do not."""
    decay, no_decay = [], []
    for _, p in _named_trainable(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "kind": "adamw"}]
    groups.append({"params": no_decay, "weight_decay": 0.0, "kind": "adamw"})
    return [g for g in groups if g["params"]]


def muon_parameter_groups(model: nn.Module, weight_decay: float, lr: float, muon_lr: float) -> list[dict]:
    """Muon for the hidden 2-D matrices; AdamW for embeddings, output head and 1-D parameters."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, adam_decay, adam_no_decay = [], [], []
    for name, p in _named_trainable(model):
        is_head = name.split(".")[0] in ("lm_head", "head") or name.startswith("lm_head")
        if p.dim() == 2 and id(p) not in embedding_params and not is_head:
            muon.append(p)
        elif p.dim() >= 2:
            adam_decay.append(p)
        else:
            adam_no_decay.append(p)
    groups = [
        {"params": muon, "kind": "muon", "lr": muon_lr, "weight_decay": weight_decay},
        {"params": adam_decay, "kind": "adamw", "lr": lr, "weight_decay": weight_decay},
        {"params": adam_no_decay, "kind": "adamw", "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _named_trainable(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    # named_parameters() yields a tied weight once, under its first name
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


class Optimizer:
    """A minimal stand-in for `torch.optim.Optimizer`: param groups, per-parameter state, and
    the same `state_dict()` layout (params as indices), so GradScaler and checkpoints work.

    Why not subclass torch's: its constructor imports torch._dynamo, seconds of start-up that
    every short CLI run and test would pay for nothing.
    """

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.state: dict[torch.Tensor, dict] = defaultdict(dict)
        self.param_groups: list[dict] = []
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        group = dict(group)
        group["params"] = list(group["params"])
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group.setdefault("initial_lr", group["lr"])
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{len(saved_groups)} parameter groups saved, {len(self.param_groups)} here")
        by_index: dict[int, torch.Tensor] = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("a parameter group's size differs from the saved one")
            by_index.update(zip(saved["params"], group["params"]))
        self.state = defaultdict(dict)
        for i, values in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {
                k: (v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
                    if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                for k, v in values.items()
            }
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value


class AdamW(Optimizer):
    """AdamW; same update as `torch.optim.AdamW` (tests hold it to it), multi-tensor kernels."""

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, kind="adamw")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            adamw_group_step(self, group)
        return loss


class Muon(Optimizer):
    """Muon for groups with `kind="muon"`, AdamW for the others, in one optimizer."""

    def __init__(
        self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
        betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=tuple(betas),
            eps=eps, weight_decay=weight_decay, kind="muon",
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group_step(group)
            else:
                adamw_group_step(self, group)
        return loss

    def _muon_group_step(self, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = 0
            state["step"] += 1
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            update = orthogonalize(update, steps=group["ns_steps"])
            # keep the RMS of the update independent of the matrix's aspect ratio
            update *= max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)


def adamw_group_step(optimizer: Optimizer, group: dict) -> None:
    """One AdamW update of a parameter group, with the multi-tensor `_foreach` kernels."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
    for p in params:
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    if _native_adamw_applies(params, grads, exp_avgs, exp_avg_sqs):
        from scratchlm.train.native import adamw_step_

        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            adamw_step_(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, step=s)
        return
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    if wd:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    bias_correction2_sqrt = [math.sqrt(1.0 - beta2**s) for s in steps]
    step_sizes = [-lr / (1.0 - beta1**s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def _native_adamw_applies(*tensor_lists) -> bool:
    """One pass per parameter in C (scratchlm.train.native) for fp32 CPU training; the update
    is the same to float rounding, but memory traffic is a third of the multi-tensor ops'."""
    if tensor_lists[0][0].device.type != "cpu":
        return False
    from scratchlm.train import native

    return native.adamw_applies([t for tensors in tensor_lists for t in tensors])


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T by a quintic Newton-Schulz iteration (Muon).

    The coefficients (3.4445, -4.7750, 2.0315) push singular values towards 1 fast without
    needing convergence; bf16 is enough for that and is what makes it cheap.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16)
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the short side: X X^T is then the smaller matrix
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.T
    return x


def build_optimizer(model: nn.Module, train_cfg) -> Optimizer:
    """The optimizer a `TrainConfig` asks for, with its parameter groups."""
    betas = (train_cfg.beta1, train_cfg.beta2)
    if train_cfg.optimizer == "adamw":
        groups = parameter_groups(model, train_cfg.weight_decay)
        return AdamW(groups, lr=train_cfg.lr, betas=betas, eps=train_cfg.eps)
    if train_cfg.optimizer == "muon":
        groups = muon_parameter_groups(model, train_cfg.weight_decay, train_cfg.lr, train_cfg.muon_lr)
        return Muon(groups, lr=train_cfg.muon_lr, momentum=train_cfg.muon_momentum, betas=betas,
                    eps=train_cfg.eps)
    if train_cfg.optimizer == "adamw8bit":
        from scratchlm.train.optim8bit import AdamW8bit

        groups = parameter_groups(model, train_cfg.weight_decay)
        return AdamW8bit(groups, lr=train_cfg.lr, betas=betas, eps=train_cfg.eps)
    raise ValueError(f"unknown optimizer {train_cfg.optimizer!r}")


def set_lr_factor(optimizer: Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
