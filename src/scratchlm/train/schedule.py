"""Learning-rate schedules: linear warm-up, then cosine decay, warmup-stable-decay, or constant.

A schedule is a pure function of the step, returning a factor in [0, 1] that multiplies each
parameter group's peak learning rate; being pure, it needs no state in a checkpoint. Not for
choosing the peak rates themselves (see the `train` config section and `optim.py`).
"""

from __future__ import annotations

import math


def lr_factor(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1) so the very first update already moves; reaches 1.0 at the end of warm-up
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        # warmup-stable-decay (Hu et al. 2024, MiniCPM): flat at the peak, then a linear cool-down
        # over the last `decay_fraction` of the run, so a run can be extended before its decay.
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_from_config(train_cfg) -> "callable":
    """`step -> factor` for a `TrainConfig`."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            max_steps=train_cfg.max_steps,
            warmup_steps=train_cfg.warmup_steps,
            schedule=train_cfg.schedule,
            min_lr_ratio=train_cfg.min_lr_ratio,
            decay_fraction=train_cfg.decay_fraction,
        )

    return factor
