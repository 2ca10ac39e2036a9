"""CPU workers (`train.cpu_workers`): a micro-batch split across threads trains like the plain
loop (same maths up to float rounding), is bit-for-bit repeatable and resumable, is planned
from the thread count, and stays off where it would not be exact (dropout)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import TINY, corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.config import load_config
from scratchlm.errors import UserError
from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.train.cpu_workers import CpuWorkers, plan_workers
from scratchlm.train.pretrain import next_token_loss_fused, pretrain
from scratchlm.train.trainer import Strategy, make_cpu_workers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tokenizer = train_tokenizer(corpus_texts(), 300)
    return make_dataset(tmp_path_factory.mktemp("ds"), tokenizer, corpus_texts())


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def run(dataset, out, *sets):
    return pretrain(dataset, out, load_config(None, [*TINY, "model.preset=gpt2-tiny", "train.eval_every=0",
                                                     *sets]))


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_workers_train_like_the_plain_loop(dataset, tmp_path, dtype, tolerance):
    common = ["train.max_steps=3", f"train.dtype={dtype}", "train.micro_batch_size=8"]
    plain = run(dataset, tmp_path / "plain", *common, "train.cpu_workers=1")
    split = run(dataset, tmp_path / "split", *common, "train.cpu_workers=4")
    assert split.tokens == plain.tokens == 3 * 8 * 32
    assert split.last_loss == pytest.approx(plain.last_loss, rel=tolerance)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "split")
    moved = weights(tmp_path / "plain" / "checkpoints" / "step_00000003")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tolerance, atol=tolerance * 0.2)
    assert all(torch.equal(a[key], moved[key]) for key in a)
    assert any(not torch.equal(a[key], b[key]) for key in a), "both runs took the same path"


def test_workers_with_accumulation_match_one_big_batch(dataset, tmp_path):
    common = ["train.max_steps=2", "train.grad_clip=0", "train.cpu_workers=2"]
    run(dataset, tmp_path / "big", *common, "train.micro_batch_size=8")
    run(dataset, tmp_path / "accum", *common, "train.micro_batch_size=4", f"train.batch_tokens={8 * 32}")
    a, b = weights(tmp_path / "big"), weights(tmp_path / "accum")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-6)


def test_workers_are_repeatable_and_resume_bit_for_bit(dataset, tmp_path):
    common = ["train.dtype=bf16", "train.cpu_workers=2", "train.ckpt_every=2"]
    run(dataset, tmp_path / "once", *common, "train.max_steps=4")
    run(dataset, tmp_path / "again", *common, "train.max_steps=4")
    run(dataset, tmp_path / "resumed", *common, "train.max_steps=2")
    result = run(dataset, tmp_path / "resumed", *common, "train.max_steps=4")
    assert result.resumed_from is not None
    a = weights(tmp_path / "once")
    for other in ("again", "resumed"):
        b = weights(tmp_path / other)
        assert all(torch.equal(a[key], b[key]) for key in a), other


def test_plan_follows_threads_and_batch():
    assert plan_workers(0, 16, 2) == (2, 1)
    assert plan_workers(0, 16, 16) == (8, 2)  # each worker keeps at least two rows
    assert plan_workers(0, 12, 8) == (6, 1)  # a divisor of the micro-batch
    assert plan_workers(0, 3, 2) == (1, 2)  # one row each would be all a worker gets: off
    assert plan_workers(0, 16, 1) == (1, 1)
    assert plan_workers(1, 16, 2) == (1, 2)
    assert plan_workers(4, 16, 2) == (4, 1)
    with pytest.raises(UserError, match="must divide train.micro_batch_size"):
        plan_workers(3, 16, 2)
    with pytest.raises(UserError, match="cpu_workers must be >= 0"):
        plan_workers(-1, 16, 2)


class _SplittableTask:
    def split_batch(self, batch, parts):
        return [batch] * parts


def test_workers_stay_off_where_they_would_not_be_exact():
    cfg = load_config(None, [*TINY, "train.cpu_workers=2"]).train
    model = Transformer(model_config("gpt2-tiny"))
    params = list(model.parameters())
    cpu = torch.device("cpu")
    workers = make_cpu_workers(cfg, model, _SplittableTask(), cpu, Strategy(), None, params)
    assert isinstance(workers, CpuWorkers) and workers.workers == 2
    workers.close()
    dropout = Transformer(model_config("gpt2-tiny", dropout=0.1))
    assert make_cpu_workers(cfg, dropout, _SplittableTask(), cpu, Strategy(), None, params) is None
    assert make_cpu_workers(cfg, model, object(), cpu, Strategy(), None, params) is None
    assert make_cpu_workers(cfg, model, _SplittableTask(), cpu, type("DDP", (Strategy,), {})(),
                             None, params) is None


def test_fused_loss_from_two_threads_at_once_matches_one_at_a_time():
    torch.manual_seed(0)
    model = Transformer(model_config("gpt2-tiny"))
    batches = [torch.randint(0, model.config.vocab_size, (2, 17)) for _ in range(2)]
    expected = [next_token_loss_fused(model, b[:, :-1], b[:, 1:]) for b in batches]
    results, start = [None, None], threading.Barrier(2)

    def work(i):
        start.wait()
        for _ in range(20):  # many forwards, so the two threads interleave
            results[i] = next_token_loss_fused(model, batches[i][:, :-1], batches[i][:, 1:])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))
    assert isinstance(model.lm_head, torch.nn.Linear)
