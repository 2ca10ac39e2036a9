"""DPO on a tiny model: held-out reward accuracy rises well above chance; the reference is cached
once (and is the base with adapters off under LoRA); resume after kill -9 is exact."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from test_sft import kill_mid_run, tiny_model

from scratchlm.tokenizer import BPETokenizer

WORDS = "red blue green fox dog cat runs sits jumps over under near the a big small old new".split()
TEXT = " ".join(WORDS + [w.upper() for w in WORDS]) * 20 + " Describe something. DESCRIBE"


def phrases():
    rng = random.Random(0)
    combos = list(itertools.permutations(WORDS[:12], 3))
    rng.shuffle(combos)
    return [" ".join(c) for c in combos]


def write_pairs(path: Path, texts):
    # chosen: the phrase in lower case; rejected: the same phrase shouted
    rows = [{"prompt": "Describe something.", "chosen": t, "rejected": t.upper()} for t in texts]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def setup(tmp_path):
    from scratchlm.runs import save_run

    tok = BPETokenizer.train([TEXT], 300, progress=False)
    model = tiny_model(tok.vocab_size)
    save_run(tmp_path / "parent", model, tok, {"model": model.config.to_dict()})
    texts = phrases()
    train = write_pairs(tmp_path / "train.jsonl", texts[:64])
    val = write_pairs(tmp_path / "val.jsonl", texts[64:96])  # phrases never trained on
    return tmp_path / "parent", train, val


def dpo_overrides(train: Path, val: Path, steps: int, extra=()) -> list[str]:
    return [f"dpo.data=[\"{train}\"]", f"dpo.val_data=[\"{val}\"]", f"train.max_steps={steps}",
            "train.seq_len=64", "train.micro_batch_size=8", "train.ckpt_every=3", "train.eval_every=0",
            "train.log_every=1", "train.progress=false", "train.warmup_steps=1", "train.lr=3e-3",
            "train.dtype=fp32", "train.tensorboard=false", "dpo.beta=0.5", *extra]


def test_dpo_raises_heldout_reward_accuracy(setup, tmp_path):
    from safetensors.torch import load_file

    from scratchlm.posttrain.pipeline import run_dpo, stage_config

    parent, train, val = setup
    records = []
    result = run_dpo(parent, tmp_path / "out", stage_config("dpo", overrides=dpo_overrides(train, val, 10)),
                     on_step=records.append, progress=False)
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    final = result.last_eval
    assert final["val_reward_accuracy"] >= 0.8, final
    assert final["val_reward_margin"] > 0 and final["val_loss"] < 0.6
    for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"):
        assert key in records[-1] and f"val_{key}" in records[-1]
    reference = load_file(str(tmp_path / "out" / "reference_logps.safetensors"))
    assert reference["train"].shape == (64, 2) and reference["val"].shape == (32, 2)


def test_lora_reference_is_the_base_with_adapters_off(setup, tmp_path):
    from scratchlm.model.lora import adapters_disabled, has_lora
    from scratchlm.posttrain import pipeline
    from scratchlm.posttrain.dpo import compute_reference_logps

    parent, train, val = setup
    seen = {}
    original = pipeline.reference_logps

    def spy(out, model, train_examples, *args, **kwargs):
        seen["model"], seen["examples"] = model, train_examples
        return original(out, model, train_examples, *args, **kwargs)

    pipeline.reference_logps = spy
    try:
        config = pipeline.stage_config("dpo", overrides=dpo_overrides(train, val, 2, ["train.ckpt_every=0"]),
                                       lora_rank=4)
        pipeline.run_dpo(parent, tmp_path / "out", config, progress=False)
    finally:
        pipeline.reference_logps = original
    model = seen["model"]
    assert has_lora(model)
    from safetensors.torch import load_file

    cached = load_file(str(tmp_path / "out" / "reference_logps.safetensors"))["train"]
    with adapters_disabled(model):
        again = compute_reference_logps(model, seen["examples"], 8, 0, "cpu")
    torch.testing.assert_close(again, cached, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(compute_reference_logps(model, seen["examples"], 8, 0, "cpu"), cached, atol=1e-4)


def test_dpo_resume_after_kill_9_is_exact(setup, tmp_path):
    from safetensors.torch import load_file

    from scratchlm.posttrain.pipeline import run_dpo, stage_config

    parent, train, val = setup
    overrides = dpo_overrides(train, val, 6)
    run_dpo(parent, tmp_path / "straight", stage_config("dpo", overrides=overrides), progress=False)
    kill_mid_run("dpo", parent, tmp_path / "killed", overrides, kill_at=4)  # last checkpoint: step 3
    result = run_dpo(parent, tmp_path / "killed", stage_config("dpo", overrides=overrides), progress=False)
    assert result.resumed_from == 3
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = lambda p: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["reward_margin"] for r in metrics(tmp_path / "straight")] == [
        r["reward_margin"] for r in metrics(tmp_path / "killed")]
