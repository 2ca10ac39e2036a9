"""`scratchlm plan`: its memory prediction against the measured peak of real training steps on
CPU (within 15%), and its arithmetic (Chinchilla tokens, FLOPs, time, verdicts) against
first principles for GPT-2 124M and a 1B llama on an RTX 4090 and 8 x H100.

Measuring peak memory on CPU: torch's CPU allocator keeps no statistics, so each measurement
runs in a fresh process and reads the kernel's high-water mark of resident memory (VmHWM)
minus the resident size just before the model is built; MALLOC_MMAP_THRESHOLD_=65536 makes
glibc map every tensor-sized block separately and return it on free, so the high-water mark
follows live tensor bytes rather than heap fragmentation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scratchlm.cli import main
from scratchlm.model import accounting
from scratchlm.model.config import model_config
from scratchlm.plan import DEVICES, make_plan, mode_memory

MEASURE = r"""
import json, sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.train.optim import AdamW
from scratchlm.train.trainer import enable_activation_checkpointing
preset, B, T, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
cfg = model_config(preset, n_layer=4, d_model=256, n_head=4, vocab_size=8192, max_seq_len=T)
x, y = torch.randint(0, 8192, (B, T)), torch.randint(0, 8192, (B, T))
base = status("VmRSS")
model = Transformer(cfg)
if ckpt:
    enable_activation_checkpointing(model)
opt = AdamW(model.parameters(), lr=1e-3)
for _ in range(2):  # the second step has optimizer state and gradients at once
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"peak": status("VmHWM") - base}))
"""


@pytest.mark.parametrize("preset, ckpt", [("gpt2", False), ("llama", True)])
def test_memory_prediction_is_within_15_percent_of_measured_peak(preset, ckpt):
    batch, seq = 8, 256
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, preset, str(batch), str(seq), str(int(ckpt))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    cfg = model_config(preset, n_layer=4, d_model=256, n_head=4, vocab_size=8192, max_seq_len=seq)
    predicted = mode_memory(cfg, "none", 1, batch, seq, "fp32", "adamw", ckpt).total
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b"])
def test_plan_arithmetic(preset):
    cfg = model_config(preset)
    plan = make_plan(cfg, "h100", gpus=8)
    n = accounting.num_parameters(cfg)
    assert plan.parameters == n and plan.chinchilla_tokens == 20 * n and plan.tokens == 20 * n
    assert 6 * n * plan.tokens < plan.total_flops < 7.5 * n * plan.tokens  # 6N plus attention
    hours = plan.total_flops / (8 * 989e12 * 0.40) / 3600
    assert plan.wall_hours == pytest.approx(hours)
    assert plan.cost_usd == pytest.approx(hours * 8 * DEVICES["h100"].usd_per_hour)
    ddp, fsdp = plan.memory["ddp/adamw/no-ckpt"], plan.memory["fsdp/adamw/no-ckpt"]
    assert ddp["optimizer"] == 8 * n and fsdp["optimizer"] == 8 * n // 8  # sharded 8 ways
    eight = plan.memory["ddp/adamw8bit/no-ckpt"]["optimizer"]
    assert 3.8 < ddp["optimizer"] / eight < 4.0
    assert plan.memory["ddp/adamw/ckpt"]["activations"] < ddp["activations"]


def test_verdicts_for_a_4090():
    small = make_plan(model_config("gpt2-124m"), "rtx4090")
    assert small.verdict == "fits"
    big = make_plan(model_config("llama-1b"), "rtx4090")
    assert big.verdict == "does not fit" and "8-bit" in big.change  # 16 B/param of state alone is 17.6 GB
    huge = make_plan(model_config("llama-1b", n_layer=160), "rtx4090")
    assert "shard over" in huge.change


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--model", "llama-1b", "--gpu", "rtx4090"]) == 0
    text = capsys.readouterr().out
    for word in ("1.10B parameters", "Chinchilla", "FLOPs", "MFU", "cost", "8-bit", "verdict"):
        assert word in text
    assert main(["plan", "--model", "gpt2-124m", "--gpu", "h100", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 8 and "fsdp/adamw/ckpt" in data["memory"]
    assert main(["plan", "--model", "nope"]) == 2
