"""The one training loop, shared by pretraining, SFT and DPO.

`train(config, model, task, out_dir)` owns everything that is the same for every stage: device and
precision, gradient accumulation to the global batch, the optimizer and its schedule, clipping,
the time and step budgets, evaluation, metrics (JSONL, progress bar, TensorBoard, loss.png),
checkpoints and exact resume, signals and NaN/Inf handling. A *task* supplies the rest:

    task.next_batch()                      -> a batch (anything the task's loss understands)
    task.loss(model, batch)                -> (loss tensor, metrics dict, n_tokens)
    task.evaluate(model)                   -> {"val_...": float}  (called in eval mode, no grad)
    task.state_dict() / load_state_dict(d) -> JSON-able state for exact resume (e.g. the loader)

Parallelism is not in here: a `Strategy` (single process by default) wraps the model, says which
rank this is, averages numbers across ranks and makes the checkpoint manager, so DDP, FSDP and
pipeline strategies can be plugged in from `scratchlm.train.parallel` without touching the loop.
Not for building models, datasets or tasks (see `pretrain.py` and `scratchlm.posttrain`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_bytes
from scratchlm.train.cpu_alloc import keep_freed_memory
from scratchlm.train.cpu_workers import CpuWorkers, plan_workers, uses_dropout
from scratchlm.train.checkpoint import CheckpointManager, capture_rng_state, load_weights, restore_rng_state
from scratchlm.train.optim import build_optimizer, set_lr_factor
from scratchlm.train.schedule import schedule_from_config

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
PLOT_FILE = "loss.png"


class TrainingDiverged(UserError):
    """The loss was NaN/Inf for `train.max_bad_steps` steps in a row."""


# ---------------------------------------------------------------------------------------------
# Parallelism hook


class Strategy:
    """Single-process training. Parallel strategies override these hooks, nothing else."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls (DDP/FSDP wrappers go here); `model` stays the one saved."""
        return model

    def no_sync(self, wrapped: torch.nn.Module, last_micro_step: bool):
        """Context for a micro-step's backward: data-parallel skips the all-reduce until the last."""
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        """Average a number across ranks (loss for logging, NaN checks)."""
        return value

    def sum(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so all ranks stop together)."""
        return flag

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)

    def checkpoint_manager(self, directory: Path, keep: int) -> CheckpointManager:
        return CheckpointManager(directory, keep=keep, is_main=self.is_main)

    def load_model_state(self, model: torch.nn.Module, tensors: dict, source: str) -> None:
        """Put a checkpoint's weights into the model (sharded strategies scatter them)."""
        load_weights(model, tensors, source=source)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    # -- hooks for model-parallel strategies (pipeline); data-parallel ones keep the defaults --

    @property
    def data_rank(self) -> int:
        """This process's index among the ranks that read different data."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        """How many ranks read different data (pipeline stages share theirs)."""
        return self.world_size

    def accumulate(self, runner, task, accum: int, device, dtype, scaler):
        """One optimizer step's forward and backward done by the strategy itself, returning
        (loss sum over micro-batches, tokens, metrics); None = the loop's own accumulation."""
        return None

    def sync_model(self, model: torch.nn.Module, optimizer=None) -> None:
        """Make the model (and optimizer state) whole on every rank before it is evaluated or
        saved; a no-op when every rank already holds it all."""


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is available")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), making bf16 worth it."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 | bf16 | fp16 | auto -> the autocast dtype (fp32 means no autocast)."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name != "auto":
        return table[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu":  # with the CPU's faster training attention (see model.layers)
        from scratchlm.model.layers import bmm_causal_attention, training_kernels

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        stack.enter_context(bmm_causal_attention())
        if dtype == torch.bfloat16:  # and the C kernels for GELU and the causal softmax
            from scratchlm.train import native

            if native.library() is not None:
                stack.enter_context(training_kernels(gelu_tanh=native.gelu_tanh,
                                                     causal_softmax=native.causal_softmax,
                                                     causal_attention=native.causal_attention))
        return stack
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense peak tensor FLOP/s by GPU name fragment, for MFU when train.peak_tflops is not given.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0,
                   "A10G": 125.0, "L4": 121.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


def estimate_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """A stated peak for MFU: the GPU's datasheet figure; on a CPU, cores x clock x FLOPs/cycle,
    or cores x a measured single-core GEMM rate where that is higher (a VM's /proc/cpuinfo
    gives the base clock, and a boosting CPU multiplies faster than that figure allows)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                scale = 1.0 if dtype != torch.float32 else 0.5  # TF32 tensor cores run at half
                return tflops * 1e12 * scale
        return 100e12
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ghz = _cpu_ghz()
    # AVX-512 on Intel: 2 FMA units x 16 fp32 lanes x 2 FLOPs = 64 FLOPs/cycle; AMD Zen 4 runs
    # 512-bit FMAs on two 256-bit pipes: 32. Native bf16 dot products (VDPBF16PS) double either.
    per_cycle = 32.0 if "AuthenticAMD" in _cpuinfo() else 64.0
    low_precision = dtype != torch.float32 and cpu_has_native_bf16()
    if low_precision:
        per_cycle *= 2
    return cores * max(ghz * 1e9 * per_cycle, _measured_core_gemm_flops(low_precision))


@functools.lru_cache(maxsize=None)
def _measured_core_gemm_flops(bf16: bool) -> float:
    """FLOP/s of a 512^3 GEMM on one thread (best of a few, ~50 ms in all)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    own = torch.Generator().manual_seed(0)  # the global RNG is training state: leave it alone
    a, b = (torch.randn(512, 512, generator=own).to(dtype) for _ in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, (time.perf_counter() - start) / 4)
    finally:
        torch.set_num_threads(threads)
    return 2 * 512**3 / best


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpu_ghz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return 2.5


# ---------------------------------------------------------------------------------------------
# Metrics output


class MetricsLog:
    """metrics.jsonl (appended, flushed per line), TensorBoard when installed, and loss.png."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.out_dir = out_dir
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.file = None
        self.tb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except Exception:  # tensorboard not installed (or broken): the JSONL is the record
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        atomic_write_bytes(self.path, ("\n".join(kept) + ("\n" if kept else "")).encode("utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
        if self.enabled:
            plot_losses(self.path, self.out_dir / PLOT_FILE)


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Train and validation loss against tokens, from metrics.jsonl, as a PNG."""
    if not metrics_path.exists():
        return
    records = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    train_pts = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    val_pts = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if not train_pts and not val_pts:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", linewidth=1)
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Signals


class StopSignal:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT aborts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    step: int
    tokens: int
    stopped: str  # "max_steps" | "max_minutes" | "signal"
    signal: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_loss: float | None = None
    resumed_from: int | None = None
    checkpoint: Path | None = None


@dataclass
class _Progress:
    """What the loop counts, saved in each checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # wall clock spent in earlier sessions of this run


def accumulation_steps(train_cfg, world_size: int = 1) -> int:
    """Micro-batches per optimizer step so that the global batch is `train.batch_tokens`."""
    per_micro = train_cfg.micro_batch_size * train_cfg.seq_len * world_size
    if train_cfg.batch_tokens <= 0:
        return 1
    if train_cfg.batch_tokens % per_micro:
        raise UserError(
            f"train.batch_tokens ({train_cfg.batch_tokens}) must be a multiple of "
            f"micro_batch_size x seq_len x processes = {per_micro}"
        )
    return train_cfg.batch_tokens // per_micro


def train(
    config,
    model: torch.nn.Module,
    task,
    out_dir: str | os.PathLike,
    *,
    strategy: Strategy | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train `model` on `task` as `config.train` says, checkpointing into `out_dir/checkpoints`.

    Resumes from the latest valid checkpoint there if any. `on_step(record)` is called after
    every logged step (tests and notebooks use it). The caller saves the final run artifacts.
    """
    cfg = config.train
    strategy = strategy or Strategy()
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    accum = accumulation_steps(cfg, strategy.data_world_size)

    torch.manual_seed(cfg.seed + strategy.rank)
    if device.type == "cpu":
        keep_freed_memory()  # activations reuse freed heap instead of re-faulting fresh pages
    model.to(device)
    wrapped = strategy.wrap(model)
    optimizer = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    lr_factor = schedule_from_config(cfg)

    manager = strategy.checkpoint_manager(out_dir / CHECKPOINT_DIR, cfg.keep_checkpoints)
    progress = _Progress()
    resumed_from = _resume(manager, strategy, model, optimizer, task, progress, device)

    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    runner = torch.compile(wrapped) if cfg.compile else wrapped
    workers = make_cpu_workers(cfg, model, task, device, strategy, scaler, params)

    metrics = MetricsLog(out_dir, enabled=strategy.is_main, tensorboard=cfg.tensorboard)
    if resumed_from is not None:
        metrics.truncate_after(progress.step)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops > 0 else estimate_peak_flops(device, dtype)
    flops_per_token = _flops_per_token(model, cfg.seq_len)
    bar = _progress_bar(cfg, progress.step, enabled=strategy.is_main and cfg.progress)

    session_start = time.perf_counter()
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes > 0 else math.inf
    window = {"t": time.perf_counter(), "tokens": 0, "train_s": 0.0}
    bad_steps = 0
    result = TrainResult(step=progress.step, tokens=progress.tokens, stopped="max_steps",
                         resumed_from=resumed_from)
    last_ckpt_step = progress.step if resumed_from is not None else None
    if resumed_from is not None:
        result.checkpoint = manager.latest_valid()
    wrapped.train()
    try:
        with StopSignal() as stop:
            while progress.step < cfg.max_steps:
                if progress.elapsed_s + (time.perf_counter() - session_start) >= budget_s:
                    result.stopped = "max_minutes"
                    break
                t0 = time.perf_counter()
                set_lr_factor(optimizer, lr_factor(progress.step))
                loss_sum, n_tokens, task_metrics = _accumulate(
                    runner, task, accum, device, dtype, scaler, strategy, workers
                )
                loss_value = strategy.mean(loss_sum / accum)
                finite, grad_norm = _apply_update(optimizer, scaler, strategy, params, cfg.grad_clip,
                                                  loss_value)
                bad_steps = 0 if finite else bad_steps + 1
                progress.step += 1
                progress.tokens += n_tokens
                window["tokens"] += n_tokens
                window["train_s"] += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                if not finite:
                    _report_bad_step(progress.step, loss_value, grad_norm, bad_steps, cfg.max_bad_steps)
                else:
                    result.last_loss = loss_value

                is_last = progress.step >= cfg.max_steps
                do_eval = finite and cfg.eval_every > 0 and progress.step % cfg.eval_every == 0
                if finite and (do_eval or is_last or progress.step % max(1, cfg.log_every) == 0):
                    tok_s = window["tokens"] / max(window["train_s"], 1e-9)
                    record = {
                        "step": progress.step,
                        "tokens": progress.tokens,
                        "loss": loss_value,
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": grad_norm,
                        "tokens_per_sec": tok_s,
                        "mfu": tok_s * flops_per_token / peak if flops_per_token else None,
                        "elapsed_s": round(progress.elapsed_s + time.perf_counter() - session_start, 3),
                        **{k: v for k, v in task_metrics.items() if k != "loss"},
                    }
                    if do_eval or is_last:
                        strategy.sync_model(model, optimizer)
                        result.last_eval = _evaluate(wrapped, model, task, device, dtype)
                        record.update(result.last_eval)
                    window = {"t": time.perf_counter(), "tokens": 0, "train_s": 0.0}
                    metrics.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
                    if on_step is not None:
                        on_step(record)

                stop_now = strategy.any(stop.received is not None)
                if (cfg.ckpt_every > 0 and progress.step % cfg.ckpt_every == 0) or stop_now:
                    progress.elapsed_s += time.perf_counter() - session_start
                    session_start = time.perf_counter()
                    strategy.sync_model(model, optimizer)
                    result.checkpoint = _save(manager, model, optimizer, task, progress, config)
                    last_ckpt_step = progress.step
                if stop_now:
                    result.stopped = "signal"
                    result.signal = stop.received
                    break
            if last_ckpt_step != progress.step:
                progress.elapsed_s += time.perf_counter() - session_start
                strategy.sync_model(model, optimizer)
                result.checkpoint = _save(manager, model, optimizer, task, progress, config)
    finally:
        if bar is not None:
            bar.close()
        if workers is not None:
            workers.close()
        metrics.close()
    result.step, result.tokens = progress.step, progress.tokens
    return result


def _apply_update(optimizer, scaler, strategy, params, grad_clip: float, loss_value: float):
    """Clip and step unless the loss or the gradients are not finite; returns (stepped, norm)."""
    grad_norm = float("nan")
    finite = math.isfinite(loss_value)
    if finite:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = float(strategy.clip_grad_norm(params, grad_clip))
        # with fp16 the scaler skips steps with inf gradients itself (and lowers its scale)
        finite = math.isfinite(grad_norm) or scaler is not None
    if finite:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


def _report_bad_step(step: int, loss_value: float, grad_norm: float, bad_steps: int, limit: int) -> None:
    _warn(f"step {step}: loss {loss_value} / grad norm {grad_norm} not finite; "
          f"step skipped ({bad_steps} in a row)")
    if bad_steps >= limit:
        raise TrainingDiverged(
            f"loss or gradients were NaN/Inf for {bad_steps} steps in a row (up to step {step}); "
            "stopping without saving. Try a lower train.lr, train.dtype=fp32 or bf16, or a "
            "smaller train.grad_clip"
        )


def make_cpu_workers(cfg, model, task, device, strategy, scaler, params) -> CpuWorkers | None:
    """Threads that split each micro-batch on a CPU (`train.cpu_workers`), where that is safe."""
    if (device.type != "cpu" or type(strategy) is not Strategy or cfg.compile or scaler is not None
            or not hasattr(task, "split_batch") or uses_dropout(model)):
        return None
    workers, intra_threads = plan_workers(cfg.cpu_workers, cfg.micro_batch_size, torch.get_num_threads())
    return CpuWorkers(workers, intra_threads, params) if workers > 1 else None


def thread_autocast(device, dtype):
    """The per-thread half of `autocast_context` (what a CPU worker thread enters itself)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _accumulate(runner, task, accum: int, device, dtype, scaler, strategy, workers=None):
    """Forward and backward over `accum` micro-batches; gradients add up in `.grad`."""
    custom = strategy.accumulate(runner, task, accum, device, dtype, scaler)
    if custom is not None:
        return custom
    loss_sum = torch.zeros((), device=device)
    n_tokens = 0
    metrics: dict[str, float] = {}
    for micro in range(accum):
        batch = task.next_batch()
        if workers is not None:
            with autocast_context(device, dtype):  # its process-wide switches hold for the workers
                loss, micro_metrics, micro_tokens = workers.forward_backward(
                    runner, task, batch, 1.0 / accum, lambda: thread_autocast(device, dtype))
        else:
            loss, micro_metrics, micro_tokens = _forward_backward(runner, task, batch, accum, micro, device,
                                                                  dtype, scaler, strategy)
        loss_sum += loss.detach().float()
        n_tokens += int(micro_tokens)
        for key, value in (micro_metrics or {}).items():
            metrics[key] = metrics.get(key, 0.0) + float(value) / accum
    return float(loss_sum), int(strategy.sum(n_tokens)), metrics


def _forward_backward(runner, task, batch, accum: int, micro: int, device, dtype, scaler, strategy):
    """One micro-batch on this thread: loss, then its gradients / accum added into `.grad`."""
    with strategy.no_sync(runner, last_micro_step=micro == accum - 1):
        with autocast_context(device, dtype):
            loss, micro_metrics, micro_tokens = task.loss(runner, batch)
        scaled = loss / accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss, micro_metrics, micro_tokens


@torch.no_grad()
def _evaluate(wrapped, model, task, device, dtype) -> dict[str, float]:
    wrapped.eval()
    try:
        with autocast_context(device, dtype):
            return {k: float(v) for k, v in task.evaluate(wrapped).items()}
    finally:
        wrapped.train()


def _save(manager, model, optimizer, task, progress: _Progress, config) -> Path | None:
    state = {
        "tokens": progress.tokens,
        "elapsed_s": progress.elapsed_s,
        "rng": capture_rng_state(),
        "task": task.state_dict(),
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
    }
    return manager.save(progress.step, model, optimizer, state)


def _resume(manager, strategy, model, optimizer, task, progress: _Progress, device) -> int | None:
    checkpoint = manager.load_latest(map_location=device)
    if checkpoint is None:
        return None
    strategy.load_model_state(model, checkpoint.model, str(checkpoint.path))
    # the config's peak rates win over the saved ones (a resumed run may change train.lr)
    peaks = [group["initial_lr"] for group in optimizer.param_groups]
    try:
        strategy.load_optimizer_state(optimizer, checkpoint.optimizer)
    except (ValueError, KeyError) as e:
        raise UserError(f"checkpoint {checkpoint.path} does not fit this optimizer "
                        f"(was train.optimizer changed?): {e}") from None
    for group, peak in zip(optimizer.param_groups, peaks):
        group["initial_lr"] = peak
    task.load_state_dict(checkpoint.state["task"])
    restore_rng_state(checkpoint.state["rng"])
    progress.step = checkpoint.step
    progress.tokens = int(checkpoint.state.get("tokens", 0))
    progress.elapsed_s = float(checkpoint.state.get("elapsed_s", 0.0))
    _warn(f"resuming from {checkpoint.path} (step {checkpoint.step})")
    return checkpoint.step


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's `forward` is replaced on the instance, so module names and the state_dict stay
    exactly as they were (checkpoints and exports do not notice).
    """
    from torch.utils.checkpoint import checkpoint

    for block in getattr(model, "layers", []):
        if getattr(block, "_scratchlm_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._scratchlm_checkpointed = True


def _flops_per_token(model, seq_len: int) -> float | None:
    fn = getattr(model, "flops_per_token", None)
    return float(fn(seq_len)) if fn is not None else None


def _progress_bar(cfg, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def _warn(message: str) -> None:
    print(f"scratchlm: {message}", file=sys.stderr, flush=True)
