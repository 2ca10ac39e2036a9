"""SFT: loss only on assistant tokens, packing equals running each conversation alone, the stage
end to end with LoRA (merged run dir + adapters), and exact resume after kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.model.config import model_config
from scratchlm.model.transformer import Transformer
from scratchlm.posttrain.chat_template import add_chat_tokens
from scratchlm.posttrain.common import IGNORE
from scratchlm.posttrain.sft import SFTTask, build_examples, masked_lm_loss
from scratchlm.tokenizer import BPETokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
        "Question: what is two plus two? Answer: four.\n") * 30
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"what is {i} plus {i}?"},
     {"role": "assistant", "content": f"{2 * i}"}, {"role": "user", "content": "and the fox?"},
     {"role": "assistant", "content": "it jumps" * (1 + i % 3)}]
    for i in range(12)
]


@pytest.fixture(scope="module")
def tok():
    t = BPETokenizer.train([TEXT], 300, progress=False)
    add_chat_tokens(t)
    return t


def tiny_model(vocab_size: int, seed: int = 0, positions: str = "rope") -> Transformer:
    torch.manual_seed(seed)
    preset = "llama-tiny" if positions == "rope" else "gpt2-tiny"
    return Transformer(model_config(preset, vocab_size=vocab_size, n_layer=1, d_model=32, n_head=2,
                                    n_kv_head=2, max_seq_len=128)).eval()


def make_task(tok, packing=True, seq_len=96, batch_size=3, examples=None):
    examples = examples or build_examples(tok, CONVERSATIONS, seq_len)[0]
    return SFTTask(examples, examples[:4], seq_len, batch_size, pad_id=tok.eot_id, packing=packing, seed=5)


PACK_LEN = 128  # long enough for two or three of the conversations above


def test_targets_are_exactly_the_assistant_tokens(tok):
    examples, dropped = build_examples(tok, CONVERSATIONS, 96)
    assert dropped == 0
    for ex, conv in zip(examples, CONVERSATIONS):
        trained = [t for t in ex.targets if t != IGNORE]
        expected = "".join(m["content"] + "<|end|>" for m in conv if m["role"] == "assistant")
        assert tok.decode(trained) == expected


@pytest.mark.parametrize("packing", [True, False])
def test_prompt_tokens_get_no_gradient(tok, packing):
    model = tiny_model(tok.vocab_size)
    task = make_task(tok, packing=packing)
    batch = task.next_batch()
    captured = {}

    def capturing_model(inputs, **kwargs):
        logits = model(inputs, **kwargs)
        logits.retain_grad()
        captured["logits"] = logits
        return logits

    loss, metrics, _ = task.loss(capturing_model, batch)
    loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)  # [B, T]
    trained = batch["targets"] != IGNORE
    assert metrics["trained_tokens"] == int(trained.sum()) > 0
    assert torch.all(grad[~trained] == 0), "a prompt/padding position received gradient"
    assert torch.all(grad[trained] > 0)
    # and the loss does not depend on what the prompt targets would have been
    assert batch["targets"][~trained].eq(IGNORE).all()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_packed_loss_equals_each_conversation_alone(tok, positions):
    model = tiny_model(tok.vocab_size, positions=positions)
    task = make_task(tok, packing=True, seq_len=PACK_LEN)
    batch = task.next_batch()
    with torch.no_grad():
        packed_loss, _, _ = task.loss(model, batch)
        total, count, conversations = 0.0, 0, 0
        for b in range(batch["inputs"].shape[0]):
            for doc in batch["doc_ids"][b].unique():
                sel = batch["doc_ids"][b] == doc
                inputs, targets = batch["inputs"][b, sel][None], batch["targets"][b, sel][None]
                if (targets != IGNORE).sum() == 0:
                    continue  # the padding tail
                loss, n = masked_lm_loss(model(inputs), targets)
                total += loss.item() * n
                count += n
                conversations += 1
    assert conversations > batch["inputs"].shape[0], "rows should hold several conversations"
    assert packed_loss.item() == pytest.approx(total / count, abs=1e-5)


def test_task_state_resumes_the_same_batches(tok):
    a = make_task(tok)
    for _ in range(5):  # past an epoch boundary
        a.next_batch()
    b = make_task(tok)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------
# The stage end to end


def make_parent(tmp_path: Path, vocab: int = 300) -> Path:
    from scratchlm.runs import save_run

    tok = BPETokenizer.train([TEXT], vocab, progress=False)
    model = tiny_model(tok.vocab_size)
    save_run(tmp_path / "parent", model, tok, {"model": model.config.to_dict()})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS) + "\n")
    return tmp_path / "parent"


def sft_overrides(data: Path, steps: int, extra=()) -> list[str]:
    return [f"sft.data=[\"{data}\"]", f"train.max_steps={steps}", "train.seq_len=96",
            "train.micro_batch_size=3", "train.ckpt_every=3", "train.eval_every=0", "train.log_every=1",
            "train.progress=false", "train.warmup_steps=2", "train.lr=3e-3", "train.dtype=fp32",
            "train.tensorboard=false", *extra]


def test_sft_with_lora_learns_and_writes_a_plain_run(tmp_path):
    from scratchlm.posttrain.pipeline import run_sft, stage_config
    from scratchlm.runs import load_run

    parent = make_parent(tmp_path)
    overrides = sft_overrides(tmp_path / "chat.jsonl", 6, ["train.lr=1e-2", "train.ckpt_every=0"])
    config = stage_config("sft", overrides=overrides, lora_rank=4)
    records = []
    run_sft(parent, tmp_path / "out", config, on_step=records.append, progress=False)
    assert records[-1]["loss"] < records[0]["loss"] and "val_loss" in records[-1]
    run = load_run(tmp_path / "out")  # merged weights load into a plain Transformer
    assert "<|assistant|>" in run.tokenizer.special_tokens
    assert run.model.config.vocab_size == run.tokenizer.vocab_size
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["lora"]["rank"] == 4 and saved["stage"]["name"] == "sft" and "hf_chat_template" in saved["chat"]
    # parent + the saved adapters alone == the merged run (only adapters trained)
    from scratchlm.model.lora import adapters_disabled, load_adapters
    from scratchlm.posttrain.common import prepare_chat_vocab

    fresh = load_run(parent)
    prepare_chat_vocab(fresh.model, fresh.tokenizer)
    load_adapters(tmp_path / "out" / "adapter", fresh.model)
    x = torch.tensor([run.tokenizer.encode("what is 3 plus 3?")])
    with torch.no_grad():
        merged_logits = run.model(x)
        torch.testing.assert_close(fresh.model(x), merged_logits, rtol=1e-5, atol=1e-5)
        with adapters_disabled(fresh.model):
            assert not torch.allclose(fresh.model(x), merged_logits, atol=1e-3)


KILL_SCRIPT = """
import os, signal, sys
from scratchlm.posttrain.pipeline import run_{stage}, stage_config
overrides, kill_at = {overrides!r}, {kill_at}
def on_step(record):
    if record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
config = stage_config("{stage}", overrides=overrides, lora_rank={lora_rank})
run_{stage}({parent!r}, {out!r}, config, on_step=on_step, progress=False)
"""


def kill_mid_run(stage: str, parent: Path, out: Path, overrides: list[str], kill_at: int, lora_rank: int = 0):
    """Run the stage in a child process that SIGKILLs itself right after step `kill_at`."""
    script = KILL_SCRIPT.format(stage=stage, overrides=overrides, kill_at=kill_at, lora_rank=lora_rank,
                                parent=str(parent), out=str(out))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_sft_resume_after_kill_9_is_exact(tmp_path):
    from safetensors.torch import load_file

    from scratchlm.posttrain.pipeline import run_sft, stage_config

    parent = make_parent(tmp_path)
    overrides = sft_overrides(tmp_path / "chat.jsonl", 8)
    run_sft(parent, tmp_path / "straight", stage_config("sft", overrides=overrides), progress=False)
    kill_mid_run("sft", parent, tmp_path / "killed", overrides, kill_at=5)  # last checkpoint: step 3
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    result = run_sft(parent, tmp_path / "killed", stage_config("sft", overrides=overrides), progress=False)
    assert result.resumed_from == 3
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda p: [json.loads(l)["loss"] for l in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "straight") == lines(tmp_path / "killed")


def test_resuming_on_other_data_is_refused(tok):
    from scratchlm.errors import UserError

    a = make_task(tok)
    a.next_batch()
    other = build_examples(tok, CONVERSATIONS[:6], 96)[0]
    with pytest.raises(UserError, match="other data"):
        make_task(tok, examples=other).load_state_dict(a.state_dict())
