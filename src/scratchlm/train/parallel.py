"""Everything parallel: torchrun process groups and the DDP, FSDP2 and pipeline strategies.

The training loop (`trainer.train`) knows nothing about parallelism; it asks a `Strategy` to
wrap the model, to skip needless all-reduces, to average numbers across ranks and to make the
checkpoint manager. This module supplies the strategies, applied to the model from outside:

- `ddp`: `DistributedDataParallel`; `no_sync` on every micro-batch but the last, so gradient
  accumulation all-reduces once per optimizer step.
- `fsdp`: FSDP2 `fully_shard` on each transformer block and then the root, with a
  `MixedPrecisionPolicy`; checkpoints are sharded (`torch.distributed.checkpoint`, one file per
  rank) and reload with any number of processes; `consolidate_checkpoint` turns one into an
  ordinary `model.safetensors`.
- `pipeline`: `torch.distributed.pipelining`; the blocks are split across ranks (embedding on
  the first stage, final norm and head on the last), a step's batch is cut into micro-batches
  and run with the GPipe or 1F1B schedule. Before evaluating or saving, each stage broadcasts
  its slice (weights and optimizer state) so every rank holds the whole model and the ordinary
  checkpoint format applies.

The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
NCCL on GPUs, gloo on CPUs. `parallel.mode=auto` is DDP under torchrun and single-process
otherwise. Multi-node is torchrun's job (docs/distributed.md).

Not for the model (the model file stays free of parallelism) nor for the loop itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import UserError
from scratchlm.train.checkpoint import Checkpoint, CheckpointManager
from scratchlm.train.trainer import Strategy, autocast_context

# ---------------------------------------------------------------------------------------------
# Process group


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(backend: str = "auto") -> None:
    """Join torchrun's process group (once); pin this process to its GPU when there are GPUs."""
    if dist.is_initialized():
        return
    if not launched_by_torchrun():
        raise UserError("parallel.mode needs several processes: launch with torchrun "
                        "(e.g. torchrun --nproc-per-node 2 -m scratchlm pretrain ...)")
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend=backend, store=_rendezvous_store(rank, world), rank=rank,
                            world_size=world, timeout=timedelta(minutes=30))


def _rendezvous_store(rank: int, world: int):
    """torchrun's store, with keys private to this restart attempt.

    After `--max-restarts` restarts the workers, the agent's store still holds the addresses
    the dead attempt's ranks published; without a per-attempt prefix a new rank may connect to
    a dead one and hang. (Without torchrun's agent, rank 0 hosts the store.)
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)),
                          world, is_master=not agent_store and rank == 0,
                          timeout=timedelta(minutes=10), wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"scratchlm/attempt{attempt}", store)


def strategy_from_config(config) -> Strategy:
    """The strategy `config.parallel.mode` asks for (auto: DDP under torchrun, else single)."""
    pcfg = config.parallel
    mode = pcfg.mode
    if mode == "auto":
        mode = "ddp" if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 else "none"
    if mode == "none":
        return Strategy()
    init_process_group(pcfg.backend)
    if mode == "ddp":
        return DDPStrategy()
    if mode == "fsdp":
        if config.train.optimizer != "adamw":
            raise UserError(f"parallel.mode=fsdp supports train.optimizer=adamw only (got "
                            f"{config.train.optimizer!r}): its state is resharded by name on resume")
        return FSDPStrategy(param_dtype=_fsdp_dtype(pcfg.fsdp_param_dtype, config.train.dtype),
                            reduce_dtype=_fsdp_dtype(pcfg.fsdp_reduce_dtype, "fp32"))
    if mode == "pipeline":
        if config.data.doc_mask:
            raise UserError("parallel.mode=pipeline does not support data.doc_mask")
        return PipelineStrategy(schedule=pcfg.pipeline_schedule, microbatches=pcfg.pipeline_microbatches)
    raise UserError(f"parallel.mode: unknown mode {mode!r}")


def _fsdp_dtype(name: str, train_dtype: str) -> torch.dtype | None:
    """FSDP2's parameter / reduce dtype; None keeps the parameters' own (fp32)."""
    if name == "auto":
        name = train_dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


# ---------------------------------------------------------------------------------------------
# Strategies


class DistributedStrategy(Strategy):
    """What every multi-process strategy shares: rank, world size, collectives on numbers."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # NCCL only moves GPU tensors; gloo moves CPU ones
        self.comm_device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_reduce(self, value: float, op=dist.ReduceOp.SUM) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def mean(self, value: float) -> float:
        return self._all_reduce(value) / self.world_size

    def sum(self, value: float) -> float:
        return self._all_reduce(value)

    def any(self, flag: bool) -> bool:
        return self._all_reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0

    def barrier(self) -> None:
        dist.barrier()


class DDPStrategy(DistributedStrategy):
    """Data parallel: replicas, gradients averaged once per optimizer step."""

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if self.comm_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, wrapped: nn.Module, last_micro_step: bool):
        if last_micro_step or not hasattr(wrapped, "no_sync"):
            return contextlib.nullcontext()
        return wrapped.no_sync()


class FSDPStrategy(DistributedStrategy):
    """Fully sharded data parallel (FSDP2): each block's parameters, gradients and optimizer
    state are split across ranks and gathered for its forward and backward only."""

    def __init__(self, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None):
        super().__init__()
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.model: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, head
        self.model = model
        return model

    def no_sync(self, wrapped: nn.Module, last_micro_step: bool):
        # FSDP2's no_sync: keep unsharded gradients locally until the last micro-batch
        wrapped.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def sync_model(self, model: nn.Module, optimizer=None) -> None:
        # the root is not resharded after a forward without backward (evaluation); its
        # registered parameters must be the sharded ones again before the state is read
        for module in model.modules():
            if hasattr(module, "reshard"):
                module.reshard()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        norm = super().clip_grad_norm(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def checkpoint_manager(self, directory: Path, keep: int) -> CheckpointManager:
        return ShardedCheckpointManager(directory, keep=keep, strategy=self)

    def model_for_saving(self, model: nn.Module) -> nn.Module:
        """A plain model with the full weights (gathered on every rank: a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from scratchlm.model.transformer import Transformer

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        plain = Transformer(model.config)
        if self.is_main:  # with cpu_offload only rank 0 receives the gathered weights
            plain.load_state_dict(full)
        return plain


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP)


class ShardedCheckpointManager(CheckpointManager):
    """`checkpoints/step_N/` written by every rank with torch.distributed.checkpoint (DCP).

    The directory holds DCP's `.metadata` and one `__R_0.distcp` per rank, plus the usual
    `state.json` (written last by rank 0, with every file's sha256), so finding the latest valid
    checkpoint and pruning work as for ordinary ones. Tensors are saved by parameter name, so a
    checkpoint reloads into any number of processes (DCP reshards on load).
    """

    def __init__(self, directory: str | os.PathLike, keep: int, strategy: FSDPStrategy):
        super().__init__(directory, keep=keep, is_main=strategy.is_main)
        self.strategy = strategy

    def save(self, step: int, model: nn.Module, optimizer, state: dict[str, Any]) -> Path | None:
        import torch.distributed.checkpoint as dcp

        final = self.directory / f"step_{step:08d}"
        names = [None]
        if self.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            names = [str(tmp)]
        dist.broadcast_object_list(names, src=0)
        tmp = Path(names[0])
        self.strategy.sync_model(model)
        tensors, meta = optimizer_state_by_name(model, optimizer)
        dcp.save({"model": model.state_dict(), "optim": tensors}, checkpoint_id=str(tmp))
        if self.is_main:
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            full_state = {"format_version": 1, "sharded": True, "world_size": self.strategy.world_size,
                          **state, "step": step, "optimizer": meta, "files": files}
            from scratchlm.files import atomic_write_json

            atomic_write_json(tmp / self.STATE_FILE, full_state)
            if final.exists():
                trash = self.directory / f".{final.name}.old-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            self.prune()
        dist.barrier()
        return final if self.is_main else None

    def load(self, path: Path, map_location="cpu") -> Checkpoint:
        import torch.distributed.checkpoint as dcp

        model = self.strategy.model
        state = json.loads((path / self.STATE_FILE).read_text(encoding="utf-8"))
        meta = state.pop("optimizer")
        if not state.get("sharded"):
            raise UserError(f"{path} is not a sharded checkpoint; parallel.mode=fsdp resumes from "
                            "checkpoints written under fsdp (start a new --out)")
        model_sd = model.state_dict()
        params = dict(model.named_parameters())
        optim_sd = {f"{name}.{key}": torch.zeros_like(params[name])
                    for name, keys in meta["tensor_keys"].items() for key in keys}
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        return Checkpoint(path=path, step=int(state["step"]), model=model_sd,
                          optimizer=optimizer_state_from_names(optim_sd, meta), state=state)


def optimizer_state_by_name(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed `<param name>.<key>` (tensors) and a JSON-able rest, in which the
    param groups list parameter names instead of indices."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"state": {}, "tensor_keys": {}, "param_groups": []}
    for p, entry in optimizer.state.items():
        name = name_of[id(p)]
        meta["state"][name] = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
        meta["tensor_keys"][name] = [k for k, v in entry.items() if isinstance(v, torch.Tensor)]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value
    for group in optimizer.param_groups:
        meta["param_groups"].append({**{k: v for k, v in group.items() if k != "params"},
                                     "params": [name_of[id(p)] for p in group["params"]]})
    return tensors, meta


def optimizer_state_from_names(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse: an index-based optimizer state_dict (indices in order of first appearance,
    as `Optimizer.state_dict` numbers them)."""
    index: dict[str, int] = {}
    groups = []
    for group in meta["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    state: dict[int, dict] = {}
    for name, values in meta["state"].items():
        entry = dict(values)
        for key in meta["tensor_keys"].get(name, []):
            entry[key] = tensors[f"{name}.{key}"]
        state[index[name]] = entry
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    from scratchlm.files import sha256_file

    return sha256_file(path)


def consolidate_checkpoint(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """A sharded (DCP) checkpoint -> one ordinary `model.safetensors`; no process group needed.

    Returns the path written (default: `<checkpoint_dir>/model.safetensors`). The weights are
    loaded into a plain model built from the checkpoint's config, so tied weights are stored
    once exactly as `runs.save_run` stores them.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from scratchlm.files import atomic_write_bytes
    from scratchlm.model.config import config_from_mapping
    from scratchlm.model.transformer import Transformer
    from scratchlm.train.checkpoint import weights_for_saving

    src = Path(checkpoint_dir)
    state_path = src / CheckpointManager.STATE_FILE
    if not (src / ".metadata").is_file() or not state_path.is_file():
        raise UserError(f"{src} is not a sharded checkpoint (no .metadata / state.json)")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    model_cfg = config_from_mapping(state.get("config", {}).get("model", {}), where=str(state_path))
    model = Transformer(model_cfg)
    sd = {k: v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # "no process group: loading in one process" is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=str(src), no_dist=True)
    model.load_state_dict(sd)
    out = Path(out_path) if out_path else src / "model.safetensors"
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    save_file(weights_for_saving(model), str(tmp), metadata={"format": "pt"})
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    return out


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism


def stage_layer_bounds(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Blocks [start, stop) per stage, as even as possible (earlier stages get the extra ones,
    the last stage also runs the output head)."""
    if n_layer < n_stages:
        raise UserError(f"parallel.mode=pipeline: {n_layer} layers cannot be split over {n_stages} stages")
    base, extra = divmod(n_layer, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class PipelineStageModule(nn.Module):
    """One stage's slice of a `Transformer`: (embed), blocks[start:stop], (final norm + head).

    The modules it runs are registered here (so `.parameters()` is this stage's), while the
    model's own `embed`, `attention_inputs` and `head` methods do the work.
    """

    def __init__(self, model: nn.Module, start: int, stop: int, is_first: bool, is_last: bool):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a child: only this stage's parts are
        self.is_first, self.is_last = is_first, is_last
        self.layers = nn.ModuleList(model.layers[start:stop])
        if is_first:
            self.tok_embeddings = model.tok_embeddings
            if hasattr(model, "pos_embeddings"):
                self.pos_embeddings = model.pos_embeddings
        if is_last:
            self.norm = model.norm
            self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model
        B, T = x.shape[0], x.shape[1]
        positions = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        h = model.embed(x, positions) if self.is_first else x
        rope, mask = model.attention_inputs(positions)
        for layer in self.layers:
            h = layer(h, rope, mask)
        return model.head(h) if self.is_last else h


def _stage_params(model: nn.Module, bounds: list[tuple[int, int]]) -> list[set[int]]:
    """ids of the parameters each stage holds (a tied embedding/head is in the first and last)."""
    stages = []
    for s, (start, stop) in enumerate(bounds):
        stage = PipelineStageModule(model, start, stop, s == 0, s == len(bounds) - 1)
        stages.append({id(p) for p in stage.parameters()})
    return stages


def _pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class PipelineStrategy(DistributedStrategy):
    """Pipeline parallel: rank r runs stage r; all ranks read the same batches (no data
    parallelism), cut into micro-batches that flow through the GPipe or 1F1B schedule."""

    SCHEDULES = ("gpipe", "1f1b")

    def __init__(self, schedule: str = "1f1b", microbatches: int = 0):
        super().__init__()
        if schedule not in self.SCHEDULES:
            raise UserError(f"parallel.pipeline_schedule must be one of {', '.join(self.SCHEDULES)}")
        self.schedule_name = schedule
        self.microbatches = microbatches
        self._schedules: dict[int, Any] = {}

    @property
    def data_rank(self) -> int:
        return 0

    @property
    def data_world_size(self) -> int:
        return 1

    @property
    def is_last_stage(self) -> bool:
        return self.rank == self.world_size - 1

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.pipelining import PipelineStage

        bounds = stage_layer_bounds(len(model.layers), self.world_size)
        start, stop = bounds[self.rank]
        self.stage_module = PipelineStageModule(model, start, stop, self.rank == 0, self.is_last_stage)
        members = _stage_params(model, bounds)
        self.owner: dict[str, int] = {}
        self.shared: list[nn.Parameter] = []  # held by several stages (a tied embedding and head)
        for name, p in model.named_parameters():
            holders = [s for s, ids in enumerate(members) if id(p) in ids]
            self.owner[name] = holders[0]
            if len(holders) > 1:
                self.shared.append(p)
        self._mine = members[self.rank]
        self.device = next(model.parameters()).device
        self.stage = PipelineStage(self.stage_module, self.rank, self.world_size, self.device)
        return model  # evaluation runs the whole model, made whole by `sync_model` first

    def _schedule(self, n_micro: int):
        if n_micro not in self._schedules:
            from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

            cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
            # scale_grads: gradients are the mean over micro-batches, as with accumulation
            self._schedules[n_micro] = cls(self.stage, n_micro, loss_fn=_pipeline_loss, scale_grads=True)
        return self._schedules[n_micro]

    def _n_microbatches(self, batch_size: int, accum: int) -> int:
        n = self.microbatches or accum
        if not self.microbatches and n < self.world_size and batch_size % self.world_size == 0:
            n = self.world_size  # fewer micro-batches than stages would leave stages idle
        if batch_size % n:
            raise UserError(f"parallel.pipeline_microbatches ({n}) must divide the step's batch of "
                            f"{batch_size} sequences")
        return n

    def accumulate(self, runner, task, accum: int, device, dtype, scaler):
        if scaler is not None:
            raise UserError("parallel.mode=pipeline does not support train.dtype=fp16; use bf16 or fp32")
        batches = [task.next_batch() for _ in range(accum)]
        inputs = torch.cat([b[0] for b in batches]).to(device)
        targets = torch.cat([b[1] for b in batches]).to(device)
        schedule = self._schedule(self._n_microbatches(inputs.shape[0], accum))
        losses: list[torch.Tensor] = []
        with autocast_context(device, dtype):
            if self.rank == 0:
                schedule.step(inputs)
            elif self.is_last_stage:
                schedule.step(target=targets, losses=losses)
            else:
                schedule.step()
        self._reduce_shared_grads()
        loss = float(torch.stack([l.detach().float() for l in losses]).mean()) if losses else 0.0
        return loss * accum, int(targets.numel()), {}

    def _reduce_shared_grads(self) -> None:
        """A tied weight gets gradient from the first stage (embedding) and the last (head)."""
        for p in self.shared:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad

    def mean(self, value: float) -> float:
        # only the last stage computes the loss: broadcast its value
        return self._all_reduce(value if self.is_last_stage else 0.0)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global norm over all stages, each parameter counted once (by its owner)."""
        name_owned = self._counted_here()
        sq = torch.zeros((), dtype=torch.float64, device=self.comm_device)
        for p in params:
            if p.grad is not None and id(p) in name_owned:
                sq += p.grad.detach().double().pow(2).sum().to(self.comm_device)
        dist.all_reduce(sq)
        norm = sq.sqrt().float()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None and id(p) in self._mine:
                    p.grad.mul_(coef.to(p.grad.device))
        return norm

    def _counted_here(self) -> set[int]:
        params = dict(self.stage_module._model.named_parameters())
        return {id(params[name]) for name, owner in self.owner.items() if owner == self.rank}

    def sync_model(self, model: nn.Module, optimizer=None) -> None:
        """Every stage broadcasts the weights (and optimizer state) it owns to all ranks."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                dist.broadcast(p.data, src=self.owner[name])
        if optimizer is not None:
            self._sync_optimizer(model, optimizer)

    def _sync_optimizer(self, model: nn.Module, optimizer) -> None:
        params = dict(model.named_parameters())
        for src in range(self.world_size):
            layout = [None]
            if self.rank == src:
                layout = [{name: {k: (("tensor", tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor)
                                      else ("value", v)) for k, v in optimizer.state[params[name]].items()}
                           for name, owner in self.owner.items()
                           if owner == src and params[name] in optimizer.state}]
            dist.broadcast_object_list(layout, src=src)
            for name, entries in layout[0].items():
                state = optimizer.state[params[name]]
                for key, (kind, *info) in entries.items():
                    if kind == "value":
                        state[key] = info[0]
                        continue
                    shape, dtype = info
                    if self.rank != src:
                        state[key] = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]),
                                                 device=params[name].device)
                    dist.broadcast(state[key], src=src)

    def model_for_saving(self, model: nn.Module) -> nn.Module:
        self.sync_model(model)
        return model
