"""Direct Preference Optimization: the losses, and the DPO task for the one training loop.

For a prompt x with a preferred answer y_w and a worse one y_l, with policy pi and frozen
reference pi_ref (the SFT model), let

    h = log pi(y_w|x) - log pi_ref(y_w|x) - (log pi(y_l|x) - log pi_ref(y_l|x))

(sequence log-probabilities: sums over the answer tokens). The losses (`loss_type`):
- `sigmoid` (Rafailov et al. 2023, eq. 7):  -log sigmoid(beta * h)
- `conservative` (cDPO, labels flipped with probability eps = `label_smoothing`):
      -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
- `ipo` (Azar et al. 2023):  (h - 1 / (2 beta))^2
Implicit rewards are beta * (log pi - log pi_ref) for each answer; reward accuracy is the share of
pairs whose chosen reward is above the rejected one, the margin their mean difference.

The reference log-probabilities are computed once, before the first step, with the policy as it
starts (it *is* the reference then: the SFT model, or with LoRA the base with zero adapters), and
cached in the run dir, so only one model is ever on the device and resuming never recomputes them.

Not for SFT (see sft.py) or for the training loop itself (scratchlm.train.trainer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "conservative")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen / rejected implicit rewards (detached), all shaped [B]."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r} (known: {', '.join(LOSS_TYPES)})")
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing if loss_type == "conservative" else 0.0
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(target) where `mask` is True: [B, T, V], [B, T], [B, T] -> [B]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask.to(picked.dtype)).sum(-1)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    margin = chosen_rewards - rejected_rewards
    return {
        "rewards_chosen": chosen_rewards.mean().item(),
        "rewards_rejected": rejected_rewards.mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
    }
