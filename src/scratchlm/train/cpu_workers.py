"""CPU training with one forward and backward per core: a micro-batch split across threads.

On a CPU, torch runs each op on all its threads in turn: every GEMM, norm and kernel is cut into
pieces, the threads meet at a barrier after it, and while Python dispatches the next op (or
the autograd engine walks the graph) they wait. At small model sizes those waits are a real
share of the step (a 2-core run of the issue-4 shape kept ~1.84 of its 2 cores busy). Here the
micro-batch is cut into row groups instead, and each worker thread runs the whole forward and
backward of its group with one intra-op thread: no barriers, and one thread's Python overhead
overlaps the other's GEMMs (torch releases the GIL inside ops).

Exactness: each group's gradients come from `torch.autograd.grad` on a single-threaded graph,
and they are added in group order on the main thread, so a step is the same bit for bit
whatever the OS scheduling (exact resume holds). The loss of a step is the mean of the groups'
mean losses, the same rule gradient accumulation uses for micro-batches.

Used only where that is safe: a single process on CPU, no torch.compile, no fp16 loss scaling,
no dropout (its random numbers would be drawn in scheduling order), and a task that can cut
its batches (`task.split_batch(batch, parts)`). Not for GPUs or multi-process strategies.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from scratchlm.errors import UserError


def plan_workers(requested: int, micro_batch_size: int, threads: int) -> tuple[int, int]:
    """(worker threads, intra-op threads per worker) for `train.cpu_workers`.

    0 = auto: as many workers as torch has threads, capped so each gets at least two rows and
    rounded down to a divisor of the micro-batch. 1 = off. N = exactly N (must divide it).
    """
    if requested < 0:
        raise UserError(f"train.cpu_workers must be >= 0 (0 = auto, 1 = off), got {requested}")
    if requested == 0:
        cap = min(threads, micro_batch_size // 2)
        workers = max((d for d in range(1, cap + 1) if micro_batch_size % d == 0), default=1)
    else:
        if micro_batch_size % requested:
            raise UserError(f"train.cpu_workers={requested} must divide train.micro_batch_size "
                            f"({micro_batch_size}): each worker takes an equal share of its rows")
        workers = requested
    return workers, max(1, threads // workers)


def split_rows(batch, parts: int) -> list[tuple]:
    """A batch (a tuple of tensors with rows first) as `parts` equal groups of rows."""
    return list(zip(*(tensor.chunk(parts) for tensor in batch)))


def uses_dropout(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "dropout", 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class CpuWorkers:
    """A pool of threads that run a micro-batch's row groups concurrently (see module doc)."""

    def __init__(self, workers: int, intra_threads: int, params: list[torch.Tensor]):
        self.workers, self.intra_threads = workers, intra_threads
        self.params = params
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scratchlm-cpu-worker")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def forward_backward(self, model, task, batch, scale: float, autocast: Callable):
        """Loss of `batch` (mean over groups) with `scale` x its gradients added into `.grad`.

        `autocast()` makes the per-thread precision context each worker's forward runs in.
        Returns (loss tensor, metrics averaged over groups, tokens)."""
        parts = task.split_batch(batch, self.workers)
        main_threads = torch.get_num_threads()
        try:
            futures = [self.pool.submit(self._run_part, model, task, part, scale / self.workers, autocast)
                       for part in parts]
            results = [f.result() for f in futures]
        finally:
            # set_num_threads in a worker also changes the process-wide setting; put it back
            torch.set_num_threads(main_threads)
        self._add_gradients([grads for _, _, _, grads in results])
        loss = sum(loss for loss, _, _, _ in results) / self.workers
        metrics: dict[str, float] = {}
        for _, part_metrics, _, _ in results:
            for key, value in (part_metrics or {}).items():
                metrics[key] = metrics.get(key, 0.0) + float(value) / self.workers
        return loss, metrics, sum(int(tokens) for _, _, tokens, _ in results)

    def _run_part(self, model, task, part, scale: float, autocast: Callable):
        torch.set_num_threads(self.intra_threads)
        with autocast():
            loss, metrics, tokens = task.loss(model, part)
        grads = torch.autograd.grad(loss * scale, self.params, allow_unused=True)
        return loss.detach().float(), metrics, tokens, grads

    def _add_gradients(self, per_part: list[tuple]) -> None:
        """Sum the groups' gradients in group order, then into `.grad` (accumulation)."""
        for i, param in enumerate(self.params):
            grads = [grads[i] for grads in per_part if grads[i] is not None]
            if not grads:
                continue
            total = grads[0]
            for grad in grads[1:]:
                total = total + grad  # not in place: autograd may hand one tensor to two params
            if param.grad is None:
                param.grad = total
            else:
                param.grad.add_(total)
