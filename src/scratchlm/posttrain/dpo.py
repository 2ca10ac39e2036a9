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

from dataclasses import dataclass, field

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


# ---------------------------------------------------------------------------------------------
# The DPO task

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOConfig:
    """The `dpo` config section."""

    data: list[str] = field(default_factory=lambda: ["builtin:python-stdlib"])
    val_data: list[str] = field(default_factory=list)  # empty: builtin held-out split, or a share:
    val_fraction: float = 0.05
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | conservative
    label_smoothing: float = 0.0  # the flip probability of the conservative loss
    strict: bool = False
    max_examples: int = 0  # 0 = all


@dataclass
class PairExample:
    chosen: tuple[list[int], list[int]]  # (inputs, targets) with targets IGNORE outside the answer
    rejected: tuple[list[int], list[int]]


def build_pair_examples(tokenizer, pairs, seq_len: int) -> tuple[list[PairExample], int]:
    """Render each pair's two conversations; pairs with an answer cut away entirely are dropped."""
    from scratchlm.posttrain.chat_template import render_chat
    from scratchlm.posttrain.common import IGNORE, shift_example

    out, dropped = [], 0
    for pair in pairs:
        sides = []
        for answer in (pair.chosen, pair.rejected):
            messages = pair.prompt + answer
            ids, mask = render_chat(tokenizer, messages, train_from_message=len(pair.prompt))
            sides.append(shift_example(ids, mask, seq_len))
        if any(all(t == IGNORE for t in targets) for _, targets in sides):
            dropped += 1
            continue
        out.append(PairExample(sides[0], sides[1]))
    return out, dropped


def pair_batch(examples: list[PairExample], indices: list[int], pad_id: int) -> dict:
    """[2B, T] rows: the B chosen answers, then the B rejected ones."""
    from scratchlm.posttrain.common import pad_rows

    rows = [examples[i].chosen for i in indices] + [examples[i].rejected for i in indices]
    inputs, targets = pad_rows(rows, pad_id)
    return {
        "inputs": inputs,
        "targets": targets,
        "index": torch.tensor(indices, dtype=torch.long),
        "n_tokens": torch.tensor([len(r[0]) for r in rows]),
    }


def batch_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen and the rejected answers of a pair batch: [B], [B]."""
    from scratchlm.posttrain.common import IGNORE

    targets = batch["targets"]
    logits = model(batch["inputs"])
    logps = sequence_logps(logits, targets, targets != IGNORE)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def compute_reference_logps(model, examples: list[PairExample], batch_size: int, pad_id: int,
                            device, progress: bool = False, desc: str = "reference") -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probs under `model` in eval mode, fp32, on the CPU."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    starts = range(0, len(examples), batch_size)
    if progress:
        import sys

        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
    for start in starts:
        indices = list(range(start, min(start + batch_size, len(examples))))
        batch = {k: v.to(device) for k, v in pair_batch(examples, indices, pad_id).items()}
        chosen, rejected = batch_logps(model, batch)
        out[start:start + len(indices), 0] = chosen.float().cpu()
        out[start:start + len(indices), 1] = rejected.float().cpu()
    model.train(was_training)
    return out


class DPOTask:
    """DPO on the one training loop: policy log-probs each step against the cached reference."""

    def __init__(
        self,
        train_examples: list[PairExample],
        val_examples: list[PairExample],
        train_reference: torch.Tensor,
        val_reference: torch.Tensor,
        batch_size: int,
        pad_id: int,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        seed: int = 0,
        device="cpu",
        eval_batches: int = 0,
    ):
        from scratchlm.errors import UserError
        from scratchlm.posttrain.common import examples_fingerprint

        if not train_examples:
            raise UserError("no preference pairs left to train on (all rows bad or cut away)")
        if loss_type not in LOSS_TYPES:
            raise UserError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
        if beta <= 0:
            raise UserError(f"dpo.beta must be positive, got {beta}")
        self.train_examples, self.val_examples = train_examples, val_examples
        self.train_reference, self.val_reference = train_reference, val_reference
        self.batch_size, self.pad_id = batch_size, pad_id
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.seed = seed
        self.device = torch.device(device)
        self.eval_batches = eval_batches
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)
        self.fingerprint = examples_fingerprint((e.chosen, e.rejected) for e in train_examples)

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "data": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        from scratchlm.posttrain.common import check_same_data

        check_same_data(state, self.fingerprint)
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)

    def next_batch(self) -> dict:
        indices = []
        for _ in range(self.batch_size):
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            indices.append(self._order[self.cursor])
            self.cursor += 1
        batch = pair_batch(self.train_examples, indices, self.pad_id)
        batch["reference"] = self.train_reference[batch["index"]]
        return {k: v.to(self.device) for k, v in batch.items()}

    def _losses(self, model, batch: dict):
        chosen, rejected = batch_logps(model, batch)
        reference = batch["reference"].to(chosen.dtype)
        return dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing)

    def loss(self, model, batch: dict):
        losses, chosen_rewards, rejected_rewards = self._losses(model, batch)
        metrics = reward_metrics(chosen_rewards, rejected_rewards)
        metrics["epoch"] = round(self.epoch + self.cursor / len(self.train_examples), 4)
        return losses.mean(), metrics, int(batch["n_tokens"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.val_examples:
            return {}
        was_training = model.training
        model.eval()
        n = len(self.val_examples)
        if self.eval_batches:
            n = min(n, self.eval_batches * self.batch_size)
        losses, chosen, rejected = [], [], []
        for start in range(0, n, self.batch_size):
            indices = list(range(start, min(start + self.batch_size, n)))
            batch = pair_batch(self.val_examples, indices, self.pad_id)
            batch["reference"] = self.val_reference[batch["index"]]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, c, r = self._losses(model, batch)
            losses.append(loss.float().cpu())
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        model.train(was_training)
        metrics = reward_metrics(torch.cat(chosen), torch.cat(rejected))
        out = {"val_loss": torch.cat(losses).mean().item()}
        out.update({f"val_{k}": v for k, v in metrics.items()})
        return out
