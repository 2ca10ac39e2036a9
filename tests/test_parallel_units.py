"""Parallel helpers that need no process group: DDP's no_sync on all micro-batches but the
last, the pipeline's layer split, and optimizer state by parameter name (what makes sharded
checkpoints reshardable) round-tripping to the index-based state_dict."""

from __future__ import annotations

import contextlib

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.train.optim import AdamW, parameter_groups
from scratchlm.train.parallel import (DDPStrategy, optimizer_state_by_name, optimizer_state_from_names,
                                      stage_layer_bounds)


class _Wrapped:
    def __init__(self):
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield


def test_ddp_skips_the_all_reduce_on_all_but_the_last_micro_batch():
    strategy = DDPStrategy.__new__(DDPStrategy)  # no process group needed for this hook
    wrapped = _Wrapped()
    for micro in range(4):
        with strategy.no_sync(wrapped, last_micro_step=micro == 3):
            pass
    assert wrapped.entered == 3


@pytest.mark.parametrize("layers, stages", [(2, 2), (5, 2), (7, 3), (8, 8)])
def test_stage_bounds_cover_every_layer_once_and_evenly(layers, stages):
    bounds = stage_layer_bounds(layers, stages)
    assert bounds[0][0] == 0 and bounds[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(UserError):
        stage_layer_bounds(1, 2)


def test_optimizer_state_by_name_round_trips():
    torch.manual_seed(0)
    model = Transformer(model_config("gpt2-tiny"))
    opt = AdamW(parameter_groups(model, 0.1), lr=1e-3)
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    opt.step()
    tensors, meta = optimizer_state_by_name(model, opt)
    assert all(name.rsplit(".", 1)[0] in dict(model.named_parameters()) for name in tensors)
    rebuilt = optimizer_state_from_names(tensors, meta)
    original = opt.state_dict()
    assert [g["params"] for g in rebuilt["param_groups"]] == [g["params"] for g in original["param_groups"]]
    for index, entry in original["state"].items():
        assert entry["step"] == rebuilt["state"][index]["step"]
        assert torch.equal(entry["exp_avg"], rebuilt["state"][index]["exp_avg"])
