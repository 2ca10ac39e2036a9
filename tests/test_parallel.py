"""Parallel training on 2 CPU processes (gloo): DDP, FSDP2 and pipeline (GPipe, 1F1B) each follow
the single-process loss curve at the same global batch; a sharded checkpoint written by 2
processes resumes with 1 and with 2 and consolidates into the run's weights; a rank killed
mid-run is restarted by torchrun and the job resumes from its last checkpoint.

Ranks are forked from the test process (torch is already imported, so a rank starts in
milliseconds rather than the seconds a fresh interpreter takes); only the restart test launches
torchrun itself, because torchrun's restart is what it checks.

Tolerance: losses agree to 2e-5 nats and weights to 1e-4 (fp32; only the order of the
reductions differs between modes, which moves the last bits).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.config import load_config
from scratchlm.train.pretrain import pretrain

LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4

BASE = [
    "model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
    "model.dropout=0.0", "train.seq_len=32", "train.dtype=fp32", "train.progress=false",
    "train.tensorboard=false", "train.warmup_steps=2", "train.log_every=1", "train.eval_batches=2",
    "train.eval_every=0", "train.keep_checkpoints=3",
]
GLOBAL_BATCH = "train.batch_tokens=256"  # 8 sequences of 32: two micro-batches of 4 on one process


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    texts = corpus_texts(60_000)
    return make_dataset(tmp_path_factory.mktemp("ds"), train_tokenizer(texts, 300), texts)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, dataset, out, sets) -> None:
    code = 0
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        pretrain(dataset, out, load_config(None, sets))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)


def run_ranks(world: int, dataset, out, sets, timeout=120) -> None:
    """`pretrain` on `world` forked processes, as torchrun would start them (same env vars)."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, dataset, out, sets)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=WEIGHT_TOL, rtol=0), k


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    """The reference: one process, micro-batches of 4, accumulated to the global batch of 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain(dataset, out, load_config(None, [*BASE, GLOBAL_BATCH, "train.micro_batch_size=4",
                                               "train.max_steps=4", "parallel.mode=none"]))
    return out


@pytest.mark.parametrize("mode, micro, extra", [
    ("ddp", 2, []),  # 2 ranks x 2 sequences x 2 accumulation steps (no_sync on the first)
    ("fsdp", 2, []),
    ("pipeline", 4, ["parallel.pipeline_schedule=gpipe"]),  # both stages see all 8 sequences
    ("pipeline", 4, ["parallel.pipeline_schedule=1f1b"]),
])
def test_each_mode_follows_the_single_process_curve(dataset, single, tmp_path, mode, micro, extra):
    out = tmp_path / "run"
    run_ranks(2, dataset, out, [*BASE, GLOBAL_BATCH, f"train.micro_batch_size={micro}",
                                "train.max_steps=4", f"parallel.mode={mode}", *extra])
    got, want = losses(out), losses(single)
    assert len(got) == len(want) == 4
    assert max(abs(a - b) for a, b in zip(got, want)) < LOSS_TOL, (got, want)
    assert want[0] != want[-1]  # it trained: the comparison is not of constants
    assert_close_weights(out / "model.safetensors", single / "model.safetensors")
    tokens = [json.loads(l)["tokens"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert tokens == [256, 512, 768, 1024]  # the global batch, counted once


def test_sharded_checkpoint_resumes_with_one_and_with_two_processes(dataset, tmp_path):
    from scratchlm.train.parallel import consolidate_checkpoint

    sets = [*BASE, GLOBAL_BATCH, "train.schedule=constant", "train.warmup_steps=0",
            "train.ckpt_every=3", "parallel.mode=fsdp"]
    reference = tmp_path / "reference"
    pretrain(dataset, reference, load_config(None, [*BASE, GLOBAL_BATCH, "train.schedule=constant",
                                                    "train.warmup_steps=0", "train.micro_batch_size=4",
                                                    "train.max_steps=6", "parallel.mode=none"]))

    first = tmp_path / "two"
    run_ranks(2, dataset, first, [*sets, "train.micro_batch_size=2", "train.max_steps=3"])
    ckpt = first / "checkpoints" / "step_00000003"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2
    # the consolidated shards are exactly the weights the run saved
    merged = consolidate_checkpoint(ckpt, tmp_path / "merged.safetensors")
    a, b = load_file(str(merged)), load_file(str(first / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    one = tmp_path / "one"
    shutil.copytree(first, one)
    run_ranks(1, dataset, one, [*sets, "train.micro_batch_size=4", "train.max_steps=6"])
    run_ranks(2, dataset, first, [*sets, "train.micro_batch_size=2", "train.max_steps=6"])
    for resumed in (one, first):
        got, want = losses(resumed), losses(reference)
        assert len(got) == 6 and max(abs(x - y) for x, y in zip(got, want)) < LOSS_TOL, (got, want)
        assert_close_weights(resumed / "model.safetensors", reference / "model.safetensors")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def test_torchrun_restarts_a_killed_rank_and_the_job_resumes(dataset, tmp_path):
    sets = [*BASE, GLOBAL_BATCH, "train.micro_batch_size=2", "train.max_steps=60",
            "train.ckpt_every=4", "train.log_every=4", "parallel.mode=ddp"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "scratchlm", "pretrain", "--data", str(dataset),
           "--out", str(out), "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_00000008").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = [c for agent in [proc.pid] for c in _children(agent)]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # one rank dies without saving anything
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from" in output, output[-3000:]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # each logged step once
    assert records[-1]["tokens"] == 60 * 256
