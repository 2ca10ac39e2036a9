"""8-bit AdamW (`train.optimizer=adamw8bit`): block-wise codes round-trip within their grid's
error, the loss after N steps of a tiny run stays within 2% of fp32 AdamW's, the state is
about 4x smaller, and a checkpoint of the 8-bit state resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train_support import TINY, corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.config import load_config
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.train.optim import AdamW, parameter_groups
from scratchlm.train.optim8bit import (AdamW8bit, dequantize_signed, dequantize_unsigned, quantize_signed,
                                       quantize_unsigned, state_bytes)
from scratchlm.train.pretrain import pretrain

LOSS_TOL = 0.02  # relative, after 40 steps


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 1000), scale=st.floats(1e-8, 1e3), seed=st.integers(0, 2**16))
def test_codes_round_trip_within_the_grid(n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    m = dequantize_signed(*quantize_signed(x, 64), like=x)
    absmax = x.view(-1)[: n].abs().max()
    # sqrt grid: the step near a normalised value y is at most ~2|y|/127 + 1/127^2
    assert ((m - x).abs() <= absmax * (2 * (x.abs() / absmax).sqrt() / 127 + 1.0 / 127**2) + 1e-30).all()
    assert (m.sign() * x.sign() >= 0).all()  # never flips a sign
    v = x * x
    back = dequantize_unsigned(*quantize_unsigned(v, 64), like=v)
    assert (back >= 0).all()
    assert ((back - v).abs() <= v.max() * 4.0 / 255 + 1e-30).all()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(model_config("gpt2-tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4))


def _train(opt_cls, steps=40):
    model = _tiny_model()
    opt = opt_cls(parameter_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    # a learnable stream: each token predicts the next of a fixed random permutation (with noise)
    perm = torch.randperm(512, generator=g)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 512, (8, 32), generator=g)
        y = perm[x]
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def test_loss_tracks_fp32_adamw_and_state_is_4x_smaller():
    ref, ref_opt = _train(AdamW)
    got, opt = _train(AdamW8bit)
    assert ref[-1] < ref[0] - 1.0  # the task is learned, so the comparison means something
    assert abs(got[-1] - ref[-1]) / ref[-1] < LOSS_TOL, (got[-1], ref[-1])
    ratio = state_bytes(ref_opt) / state_bytes(opt)
    assert 3.5 < ratio < 4.0, ratio


def test_adamw8bit_trains_and_resumes_exactly(tmp_path):
    texts = corpus_texts(40_000)
    ds = make_dataset(tmp_path / "ds", train_tokenizer(texts, 300), texts)
    sets = [*TINY, "model.preset=gpt2-tiny", "train.optimizer=adamw8bit", "train.max_steps=6",
            "train.eval_every=0", "train.schedule=constant", "train.warmup_steps=0"]
    whole = pretrain(ds, tmp_path / "whole", load_config(None, sets))
    pretrain(ds, tmp_path / "part", load_config(None, [*sets, "train.max_steps=3"]))
    resumed = pretrain(ds, tmp_path / "part", load_config(None, sets))
    assert resumed.resumed_from == 3 and resumed.last_loss == whole.last_loss
