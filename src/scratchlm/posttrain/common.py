"""What SFT and DPO share: the `lora` config section, growing the vocabulary for the chat tokens,
turning rendered conversations into (inputs, targets) rows, and the final run-dir artifacts.

Not for the losses (sft.py, dpo.py) or the training loop (scratchlm.train.trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from scratchlm.errors import UserError
from scratchlm.model.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, merged_state_dict
from scratchlm.posttrain.chat_template import CHAT_SPECIAL_TOKENS, add_chat_tokens

IGNORE = -100  # target id that takes no part in the loss
ADAPTER_DIR = "adapter"


@dataclass
class LoRASection:
    """The `lora` config section. rank 0 = full fine-tuning; qlora_bits 4/8 = frozen quantized base."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    qlora_bits: int = 0  # 0 = float base; 4 or 8 = quantize the frozen base first (QLoRA)
    qlora_group_size: int = 64

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.alpha, self.dropout, list(self.target_modules))


def register_config_sections() -> None:
    """Add `sft`, `dpo` and `lora` to the config system (idempotent)."""
    from scratchlm.config import register_section
    from scratchlm.posttrain.dpo import DPOConfig
    from scratchlm.posttrain.sft import SFTConfig

    register_section("sft", SFTConfig)
    register_section("dpo", DPOConfig)
    register_section("lora", LoRASection)


# ---------------------------------------------------------------------------------------------
# Vocabulary


def prepare_chat_vocab(model: nn.Module, tokenizer) -> list[str]:
    """Add the chat tokens to the tokenizer if missing and grow the model's embeddings to match.

    A new token's embedding (and output row, when untied) starts as the mean of the embeddings
    of its own plain-text spelling ("<|user|>" as ordinary tokens), so the new tokens start
    distinct from each other and near text the model has seen.
    """
    spellings = {t: tokenizer.encode(t) for t in CHAT_SPECIAL_TOKENS}
    added = add_chat_tokens(tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        init_rows = {tokenizer.special_tokens[t]: spellings[t] for t in added}
        resize_vocab(model, tokenizer.vocab_size, init_rows)
    return added


@torch.no_grad()
def resize_vocab(model: nn.Module, new_size: int, init_rows: dict[int, list[int]] | None = None) -> None:
    """Grow `tok_embeddings` and `lm_head` to `new_size` rows, keeping ties and old rows."""
    old = model.tok_embeddings.weight
    old_size, dim = old.shape
    if new_size <= old_size:
        return
    tied = model.lm_head.weight is model.tok_embeddings.weight
    emb = nn.Embedding(new_size, dim, device=old.device, dtype=old.dtype)
    emb.weight[:old_size] = old
    emb.weight[old_size:] = old.mean(0)
    for new_id, source_ids in (init_rows or {}).items():
        if source_ids and new_id >= old_size:
            emb.weight[new_id] = old[source_ids].mean(0)
    model.tok_embeddings = emb
    old_head = model.lm_head
    head = nn.Linear(dim, new_size, bias=old_head.bias is not None, device=old.device, dtype=old.dtype)
    if tied:
        head.weight = emb.weight
    else:
        head.weight[:old_size] = old_head.weight
        head.weight[old_size:] = old_head.weight.mean(0)
        for new_id, source_ids in (init_rows or {}).items():
            if source_ids and new_id >= old_size:
                head.weight[new_id] = old_head.weight[source_ids].mean(0)
    if old_head.bias is not None:
        head.bias.zero_()
        head.bias[:old_size] = old_head.bias
    model.lm_head = head
    model.config.vocab_size = new_size


# ---------------------------------------------------------------------------------------------
# LoRA / QLoRA set-up and the final artifacts


def setup_lora(model: nn.Module, section: LoRASection) -> list[str]:
    """Quantize the base (QLoRA) if asked, then wrap the targeted projections with adapters."""
    if not section.rank:
        if section.qlora_bits:
            raise UserError("lora.qlora_bits needs lora.rank > 0 (a quantized base cannot be trained)")
        return []
    if section.qlora_bits:
        if section.qlora_bits not in (4, 8):
            raise UserError(f"lora.qlora_bits must be 0, 4 or 8, got {section.qlora_bits}")
        from scratchlm.model.quant import quantize_model

        quantize_model(model, bits=section.qlora_bits, group_size=section.qlora_group_size,
                       embed_bits=None, head_bits=None, progress=False)
    return apply_lora(model, section.lora_config())


def merged_state_dict_any(model: nn.Module) -> dict[str, torch.Tensor]:
    """`merged_state_dict`, also for a quantized base (dequantized, then the update added)."""
    from scratchlm.model.lora import lora_modules

    quantized = [(n, m) for n, m in lora_modules(model) if not isinstance(m.base, nn.Linear)]
    if not quantized:
        return merged_state_dict(model)
    state = {}
    lora_names = dict(lora_modules(model))
    for key, value in model.state_dict().items():
        owner = next((n for n in lora_names if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = value
    for name, module in lora_names.items():
        base = module.base
        weight = base.weight if isinstance(base, nn.Linear) else base.dequantized(torch.float32)
        state[f"{name}.weight"] = (weight.detach().float() + module.delta_weight().detach().float()).to(
            module.lora_A.dtype)
        if getattr(base, "bias", None) is not None:
            state[f"{name}.bias"] = base.bias.detach()
    return state


# ---------------------------------------------------------------------------------------------
# Rows


def shift_example(ids: Sequence[int], mask: Sequence[bool], max_tokens: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) for next-token prediction, cut to `max_tokens` inputs.

    targets[i] = ids[i + 1] where that token is an assistant token, else IGNORE.
    """
    ids = list(ids)[: max_tokens + 1]
    mask = list(mask)[: max_tokens + 1]
    inputs = ids[:-1]
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return inputs, targets


def examples_fingerprint(rows) -> str:
    """A short hash of token rows, so a resumed run can tell it is on the same data."""
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        h.update(repr(row).encode())
    return h.hexdigest()[:16]


def check_same_data(saved: dict, fingerprint: str) -> None:
    if saved.get("data") not in (None, fingerprint):
        raise UserError("this output dir holds a run on other data (or another seq_len / tokenizer); "
                        "use a new --out, or the data it was started with")


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None):
    """Right-pad (inputs, targets) rows to one length -> int64 tensors [B, T], [B, T]."""
    length = length or max(len(r[0]) for r in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets
