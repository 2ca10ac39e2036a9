"""`scratchlm plan`: will this training run fit, on what, how long will it take, what will it cost?

Arithmetic on a model config (no model is built, so 70B shapes plan as fast as 1M ones), from
`scratchlm.model.accounting`: parameters; per-GPU memory for weights, gradients, optimizer state
(fp32 AdamW and 8-bit AdamW) and activations (with and without per-block checkpointing) under
each parallel mode; the Chinchilla-optimal token budget (~20 tokens per parameter, Hoffmann et
al. 2022); total training FLOPs; wall time and cost at a stated MFU and price; and a verdict:
fits / does not fit, with the cheapest change that makes it fit.

Memory model (per GPU, training with fp32 master weights and bf16 autocast on GPUs):
- none / ddp: every rank holds all weights, gradients and optimizer state.
- fsdp: weights, gradients and optimizer state are split over the N ranks; one block's
  weights are gathered (in the compute dtype) at a time, twice (forward prefetch).
- pipeline (1F1B): stage r holds 1/N of the layers and their state; stage 0 keeps N
  micro-batches in flight, so its activations are N x (1/N of the layers) = one micro-batch
  of the whole model; GPipe keeps all M micro-batches: M / N times that.
- plus a runtime reserve (CUDA context, allocator slack) of `RUNTIME_RESERVE` on GPUs.
The activation term is accounting's per-layer count of what autograd saves (checked against
measured peaks on CPU in tests/test_plan.py, within 15%), including the full logits.

Not for choosing hyper-parameters or measuring anything: see benchmarks/ and the training loop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

from scratchlm.errors import UserError

GiB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16 (fp32 on CPU) from the data sheet
    usd_per_hour: float  # rough on-demand cloud price per device, 2025 (stated, not fetched)
    compute_dtype: str = "bf16"


DEVICES = {
    "rtx4090": Device("RTX 4090", 24.0, 165.0, 0.40),
    "a100-80g": Device("A100 80GB", 80.0, 312.0, 1.60),
    "h100": Device("H100 SXM", 80.0, 989.0, 2.50),
    "cpu": Device("CPU (this machine's RAM)", 0.0, 0.0, 0.0, compute_dtype="fp32"),
}
DEFAULT_MFU = {"rtx4090": 0.40, "a100-80g": 0.40, "h100": 0.40, "cpu": 0.30}
RUNTIME_RESERVE = 1.0 * GiB  # CUDA context + caching-allocator slack
USABLE_FRACTION = 0.95
MODES = ("none", "ddp", "fsdp", "pipeline")
EIGHT_BIT_BYTES_PER_PARAM = 2 * (1 + 4 / 256)  # two moments: 1 byte + an fp32 scale per 256


@dataclass
class ModeMemory:
    """Bytes per GPU under one parallel mode and one optimizer / checkpointing choice."""

    mode: str
    weights: int
    grads: int
    optimizer: int
    activations: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.reserve


@dataclass
class Plan:
    model: str
    parameters: int
    non_embedding_parameters: int
    device: str
    gpus: int
    seq_len: int
    micro_batch_size: int
    batch_tokens: int
    chinchilla_tokens: int
    tokens: int
    total_flops: float
    mfu: float
    wall_hours: float
    cost_usd: float
    capacity: int
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    verdict: str = ""
    change: str = ""


# ---------------------------------------------------------------------------------------------
# Memory


def optimizer_bytes(cfg, optimizer: str) -> int:
    from scratchlm.model import accounting

    n = accounting.num_parameters(cfg)
    if optimizer == "adamw8bit":
        return int(n * EIGHT_BIT_BYTES_PER_PARAM)
    return accounting.optimizer_state_bytes(cfg, optimizer, 4)


def mode_memory(cfg, mode: str, gpus: int, micro_batch_size: int, seq_len: int, compute_dtype: str,
                optimizer: str = "adamw", checkpointing: bool = False, reserve: int = 0,
                pipeline_schedule: str = "1f1b", microbatches: int = 1) -> ModeMemory:
    """Per-GPU memory for one mode (see the module docstring for the model of each)."""
    from scratchlm.model import accounting

    n = accounting.num_parameters(cfg)
    weights, grads, opt = 4 * n, 4 * n, optimizer_bytes(cfg, optimizer)
    acts = accounting.activation_bytes(cfg, micro_batch_size, seq_len, compute_dtype, "fp32", checkpointing)
    if mode in ("none", "ddp"):
        return ModeMemory(mode, weights, grads, opt, acts, reserve)
    if mode == "fsdp":
        gathered = 2 * accounting.block_params(cfg) * accounting.dtype_bytes(compute_dtype)
        return ModeMemory(mode, weights // gpus + gathered, grads // gpus, opt // gpus, acts, reserve)
    if mode == "pipeline":
        in_flight = gpus if pipeline_schedule == "1f1b" else max(microbatches, gpus)
        stage_acts = int(acts * min(in_flight, max(microbatches, 1)) / gpus) if gpus > 1 else acts
        return ModeMemory(mode, weights // gpus, grads // gpus, opt // gpus, stage_acts, reserve)
    raise UserError(f"unknown parallel mode {mode!r}")


# ---------------------------------------------------------------------------------------------
# The plan


def resolve_model(model: str | None, config_path: str | None, seq_len: int | None):
    """A `ModelConfig` from a preset name or a recipe file (its [model] table)."""
    from scratchlm.model.config import config_from_mapping, model_config

    if config_path:
        from scratchlm.config import load_config

        conf = load_config(config_path)
        cfg = config_from_mapping(conf.to_dict()["model"], where=config_path)
        seq_len = seq_len or conf.train.seq_len
    elif model:
        cfg = model_config(model)
    else:
        raise UserError("scratchlm plan needs --model PRESET or --config FILE")
    seq_len = seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=seq_len)
    return cfg, seq_len


def make_plan(cfg, device: str = "rtx4090", gpus: int = 1, seq_len: int | None = None,
              batch_tokens: int = 524288, micro_batch_size: int = 8, tokens: int = 0,
              mfu: float | None = None, cpu_memory_gib: float | None = None) -> Plan:
    """Everything `scratchlm plan` prints, as data."""
    from scratchlm.model import accounting

    if device not in DEVICES:
        raise UserError(f"--gpu: unknown device {device!r}; known: {', '.join(DEVICES)}")
    if gpus < 1 or micro_batch_size < 1 or batch_tokens < 1:
        raise UserError("--gpus, --micro-batch-size and --batch-tokens must be positive")
    dev = DEVICES[device]
    seq_len = seq_len or cfg.max_seq_len
    n = accounting.num_parameters(cfg)
    chinchilla = 20 * n
    tokens = tokens or chinchilla
    total_flops = accounting.flops_per_token(cfg, seq_len) * tokens
    mfu = mfu if mfu is not None else DEFAULT_MFU[device]
    if device == "cpu":
        peak = accounting.measure_peak_flops("fp32", seconds=0.3)
        capacity = int((cpu_memory_gib or _ram_gib()) * GiB)
        reserve = 0
    else:
        peak = dev.peak_tflops * 1e12
        capacity = int(dev.memory_gib * GiB)
        reserve = int(RUNTIME_RESERVE)
    wall_s = total_flops / (gpus * peak * mfu)
    plan = Plan(model=cfg.preset or "custom", parameters=n,
                non_embedding_parameters=accounting.num_parameters(cfg, non_embedding=True),
                device=dev.name, gpus=gpus, seq_len=seq_len, micro_batch_size=micro_batch_size,
                batch_tokens=batch_tokens, chinchilla_tokens=chinchilla, tokens=tokens,
                total_flops=total_flops, mfu=mfu, wall_hours=wall_s / 3600,
                cost_usd=wall_s / 3600 * gpus * dev.usd_per_hour, capacity=capacity)
    accum = max(1, batch_tokens // (micro_batch_size * seq_len * gpus))
    for mode in MODES[1:] if gpus > 1 else ("none",):
        for optimizer in ("adamw", "adamw8bit"):
            for ckpt in (False, True):
                m = mode_memory(cfg, mode, gpus, micro_batch_size, seq_len, dev.compute_dtype, optimizer,
                                ckpt, reserve, microbatches=accum)
                plan.memory[f"{mode}/{optimizer}/{'ckpt' if ckpt else 'no-ckpt'}"] = {**asdict(m), "total": m.total}
    plan.verdict, plan.change = verdict(cfg, dev, gpus, micro_batch_size, seq_len, capacity, reserve, accum)
    return plan


def _fits(m: ModeMemory, capacity: int) -> bool:
    return m.total <= USABLE_FRACTION * capacity


def verdict(cfg, dev: Device, gpus: int, micro: int, seq_len: int, capacity: int, reserve: int, accum: int):
    """('fits' | 'does not fit', the cheapest change that fits), trying changes in order of
    what they cost in speed: none; 8-bit optimizer state (free); a smaller micro-batch with more
    accumulation; activation checkpointing (~1/3 more compute); sharding (FSDP, communication)."""
    base_mode = "ddp" if gpus > 1 else "none"

    def mem(mode="", optimizer="adamw", ckpt=False, mb=micro):
        return mode_memory(cfg, mode or base_mode, gpus, mb, seq_len, dev.compute_dtype, optimizer, ckpt,
                           reserve, microbatches=accum)

    if _fits(mem(), capacity):
        return "fits", f"fits as is ({base_mode}, fp32 AdamW, micro-batch {micro})"
    candidates = [("8-bit AdamW state (train.optimizer=adamw8bit)", dict(optimizer="adamw8bit"))]
    mb = micro // 2
    while mb >= 1:
        candidates.append((f"micro-batch {mb} with more accumulation (train.micro_batch_size={mb})", dict(mb=mb)))
        candidates.append((f"8-bit AdamW + micro-batch {mb}", dict(optimizer="adamw8bit", mb=mb)))
        mb //= 2
    candidates.append(("activation checkpointing (train.activation_checkpointing=true)", dict(ckpt=True)))
    candidates.append(("8-bit AdamW + activation checkpointing", dict(optimizer="adamw8bit", ckpt=True)))
    candidates.append(("8-bit AdamW + activation checkpointing + micro-batch 1",
                       dict(optimizer="adamw8bit", ckpt=True, mb=1)))
    if gpus > 1:
        for name, kw in [("FSDP (parallel.mode=fsdp)", {}), ("FSDP + activation checkpointing", dict(ckpt=True)),
                         ("FSDP + activation checkpointing + micro-batch 1", dict(ckpt=True, mb=1))]:
            candidates.append((name, dict(mode="fsdp", **kw)))
    for name, kw in candidates:
        if _fits(mem(**kw), capacity):
            return "does not fit", name
    need = mem(mode="fsdp" if gpus > 1 else "", optimizer="adamw8bit", ckpt=True, mb=1)
    shardable = need.weights + need.grads + need.optimizer
    more = math.ceil(shardable * gpus / max(1.0, USABLE_FRACTION * capacity - need.activations - need.reserve))
    return "does not fit", f"nothing on {gpus} GPU(s) fits; shard over >= {max(more, gpus + 1)} GPUs (FSDP)"


def _ram_gib() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        return 16.0


# ---------------------------------------------------------------------------------------------
# Printing


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(plan: Plan) -> str:
    lines = [
        f"model        {plan.model}: {_count(plan.parameters)} parameters "
        f"({_count(plan.non_embedding_parameters)} non-embedding)",
        f"hardware     {plan.gpus} x {plan.device} ({plan.capacity / GiB:.0f} GiB each)",
        f"batch        seq_len {plan.seq_len}, micro-batch {plan.micro_batch_size} sequences, "
        f"global batch {_count(plan.batch_tokens)} tokens",
        f"tokens       {_count(plan.tokens)} (Chinchilla-optimal ~20/param: {_count(plan.chinchilla_tokens)})",
        f"compute      {plan.total_flops:.3e} FLOPs (6N + attention per token)",
        f"time         {_duration(plan.wall_hours)} at {plan.mfu:.0%} MFU"
        + (f"; cost ~${plan.cost_usd:,.0f} at ${DEVICES_BY_NAME[plan.device].usd_per_hour:.2f}/GPU-hour"
           if DEVICES_BY_NAME[plan.device].usd_per_hour else ""),
        "",
        "memory per GPU (GiB)                weights   grads  optim   activ  reserve   total  fits",
    ]
    for key, m in plan.memory.items():
        fits = "yes" if m["total"] <= USABLE_FRACTION * plan.capacity else "no"
        lines.append(f"  {key:32s} {_gib(m['weights'])} {_gib(m['grads'])} {_gib(m['optimizer'])} "
                     f"{_gib(m['activations'])} {_gib(m['reserve'])} {_gib(m['total'])}  {fits}")
    lines += ["", f"verdict      {plan.verdict}: {plan.change}"]
    return "\n".join(lines)


DEVICES_BY_NAME = {d.name: d for d in DEVICES.values()}


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} minutes"
    if hours < 48:
        return f"{hours:.1f} hours"
    return f"{hours / 24:.1f} days"


# ---------------------------------------------------------------------------------------------
# CLI (thin)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="what fits: memory per GPU per parallel mode, tokens, FLOPs, time, cost",
                              description="Plan a pretraining run from a model preset or recipe: "
                              "memory per GPU under each parallel mode, Chinchilla tokens, FLOPs, "
                              "wall time and cost, and the cheapest change that makes it fit.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model preset, e.g. gpt2-124m, llama-1b")
    source.add_argument("--config", help="TOML recipe (its [model] and train.seq_len)")
    p.add_argument("--gpu", default="rtx4090", choices=list(DEVICES), help="device kind (default rtx4090)")
    p.add_argument("--gpus", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the model's max_seq_len)")
    p.add_argument("--batch-tokens", type=int, default=524288, help="global batch in tokens (default 0.5M)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--tokens", type=float, default=0, help="training tokens (default: 20 x parameters)")
    p.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default 0.40 on GPUs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)

    c = subparsers.add_parser("consolidate", help="merge a sharded (FSDP) checkpoint into model.safetensors",
                              description="Turn a sharded checkpoint dir (torch.distributed.checkpoint, "
                              "written under parallel.mode=fsdp) into one ordinary model.safetensors.")
    c.add_argument("checkpoint", help="checkpoint dir, e.g. RUN/checkpoints/step_00001000")
    c.add_argument("--out", help="output file (default: CHECKPOINT/model.safetensors)")
    c.set_defaults(func=run_consolidate)


def run_plan(args: argparse.Namespace) -> int:
    cfg, seq_len = resolve_model(args.model, args.config, args.seq_len)
    plan = make_plan(cfg, args.gpu, args.gpus, seq_len, args.batch_tokens, args.micro_batch_size,
                     int(args.tokens), args.mfu)
    if args.json:
        print(json.dumps(asdict(plan), indent=2))
    else:
        print(format_plan(plan))
    return 0


def run_consolidate(args: argparse.Namespace) -> int:
    from scratchlm.train.parallel import consolidate_checkpoint

    out = consolidate_checkpoint(args.checkpoint, args.out)
    print(f"scratchlm: wrote {out}", file=sys.stderr)
    return 0
