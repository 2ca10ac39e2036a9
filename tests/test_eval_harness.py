"""lm-evaluation-harness agreement: the same model and local task files scored by our tasks and
by lm_eval's own multiple-choice / greedy / generation / rolling logic through our adapter agree
to 1e-6 on accuracy, per example; the adapter's methods behave as lm_eval specifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from scratchlm.eval import lm_eval_adapter as A  # noqa: E402
from scratchlm.eval.bpb import document_logprob  # noqa: E402
from scratchlm.eval.toy import EOT_ID, BigramModel, ByteTokenizer, PrefixMeanModel  # noqa: E402

TOK = ByteTokenizer()


class MixedModel(torch.nn.Module):
    """A boosted bigram table (so greedy tasks have known successes) plus a causal,
    position-aware part (so context, padding and truncation matter)."""

    def __init__(self, table, max_seq_len):
        super().__init__()
        self.bigram = BigramModel(table, max_seq_len)
        self.context = PrefixMeanModel(max_seq_len=max_seq_len, seed=4)
        self.max_seq_len = max_seq_len

    def forward(self, idx, **_):
        return self.bigram(idx) + 0.5 * self.context(idx)


def mixed_model(max_seq_len=160):
    table = torch.randn(257, 257, generator=torch.Generator().manual_seed(0))
    for chain in (b"t dreaming", b":18\n\n"):  # lambada item 1; gsm8k item 0 answers "18" after "A:"
        for a, b in zip(chain, chain[1:]):
            table[a, b] += 60.0
    return MixedModel(table, max_seq_len)


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.filterwarnings("ignore::scratchlm.eval.scoring.TruncationWarning")
def test_agrees_with_lm_eval_on_every_task_type(tmp_path, eval_dir):
    small = eval_dir / "small"
    tasks = [
        {"label": "hellaswag", "file": str(small / "hellaswag_small.jsonl"), "type": "multiple_choice",
         "num_fewshot": 1, "continuation_delimiter": "\nAnswer: "},
        {"label": "piqa", "file": str(small / "piqa_small.jsonl"), "type": "multiple_choice", "num_fewshot": 2},
        {"label": "mmlu", "file": str(small / "mmlu_small.jsonl"), "type": "multiple_choice"},
        {"label": "winograd", "file": str(small / "winograd_small.jsonl"), "type": "schema", "num_fewshot": 1},
        {"label": "lambada", "file": str(small / "lambada_small.jsonl"), "type": "language_modeling"},
        {"label": "gsm8k", "file": str(small / "gsm8k_small.jsonl"), "type": "generation",
         "continuation_delimiter": "\n\nA:", "max_new_tokens": 8},
    ]
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "naïve café ünïcode", "x"]
    # Window 160: long few-shot prompts get truncated and long texts use sliding windows.
    report = A.compare_with_harness(mixed_model(160), TOK, tmp_path, bpb_texts=texts, work_dir=tmp_path)
    assert report["max_diff"] <= 1e-6, json.dumps(report, indent=1)
    rows = report["tasks"]
    assert set(rows) == {t["label"] for t in tasks}
    for label, metrics in rows.items():
        for metric, row in metrics.items():
            assert row["diff"] <= 1e-6 and row["examples_disagree"] == 0, (label, metric, row)
    # the comparison has teeth: greedy tasks have known successes, accuracies are not all equal
    assert rows["lambada"]["accuracy"]["scratchlm"] == 0.25
    assert rows["gsm8k"]["accuracy"]["scratchlm"] == 0.25
    values = {m["scratchlm"] for r in rows.values() for m in r.values()}
    assert len(values) > 2
    assert abs(report["bpb"]["scratchlm"] - report["bpb"]["lm_eval"]) <= 1e-9


def make_lm(model=None):
    return A.ScratchLM(model=model or mixed_model(32), tokenizer=TOK, batch_size="4")


def instance(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_whitespace_and_empty_context():
    lm = make_lm()
    a, b = lm.loglikelihood([
        instance("loglikelihood", ("Question: x\nAnswer:", " Paris")),
        instance("loglikelihood", ("Question: x\nAnswer: ", "Paris")),
    ])
    assert a == b  # the space belongs with the word that follows it, wherever it was given
    (empty,) = lm.loglikelihood([instance("loglikelihood", ("", "hi"))])
    table_model = lm.scorer.forward
    logits = table_model(torch.tensor([[EOT_ID, ord("h")]]))[0].double().log_softmax(-1)
    assert empty[0] == pytest.approx(float(logits[0, ord("h")] + logits[1, ord("i")]), abs=1e-5)


def test_loglikelihood_rolling_scores_each_token_after_eot():
    lm = make_lm()
    text = "rolling windows over a text longer than the 32-token window " * 2
    (total,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    assert total == pytest.approx(document_logprob(lm.scorer, TOK.encode(text), EOT_ID), abs=1e-6)
    model = BigramModel(torch.randn(257, 257, generator=torch.Generator().manual_seed(1)), 32)
    lm = make_lm(model)
    (total,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    logp = model.table.double().log_softmax(-1)
    seq = [EOT_ID] + list(text.encode())
    assert total == pytest.approx(sum(float(logp[a, b]) for a, b in zip(seq, seq[1:])), abs=1e-6)


def test_generate_until_stops_and_respects_max_tokens():
    table = torch.zeros(257, 257)
    chain = b": 42\n\nnext"
    for a, b in zip(chain, chain[1:]):
        table[a, b] = 10.0
    lm = make_lm(BigramModel(table, 64))
    out = lm.generate_until([
        instance("generate_until", ("Q:", {"until": ["\n\n"], "max_gen_toks": 50})),
        instance("generate_until", ("Q:", {"until": "\n", "max_gen_toks": 50})),
        instance("generate_until", ("Q:", {"until": ["\n\n"], "max_gen_toks": 2})),
    ])
    assert out == [" 42", " 42", " 4"]


def test_registered_and_loads_a_run_dir(tmp_path):
    from lm_eval.api.registry import get_model

    assert get_model("scratchlm") is A.ScratchLM
    transformer = pytest.importorskip("scratchlm.model.transformer")
    from scratchlm.model.config import ModelConfig
    from scratchlm.runs import save_run
    from scratchlm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["hello world, hello there"] * 4, vocab_size=270, progress=False)
    model = transformer.Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=32))
    save_run(tmp_path / "run", model, tok, {})
    lm = get_model("scratchlm").create_from_arg_string(f"path={tmp_path / 'run'}", {"batch_size": 2, "device": "cpu"})
    ((logprob, _),) = lm.loglikelihood([instance("loglikelihood", ("hello", " world"))])
    ids = [tok.eot_id] + tok.encode("hello world")
    cont = len(tok.encode("hello world")) - len(tok.encode("hello"))
    with torch.no_grad():
        logp = model.eval()(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    expected = sum(float(logp[p, ids[p + 1]]) for p in range(len(ids) - 1 - cont, len(ids) - 1))
    assert logprob == pytest.approx(expected, abs=1e-5)


def tiny_run(run_dir):
    """A 1-layer model saved as a run directory, with its tokenizer."""
    from scratchlm.model.config import ModelConfig
    from scratchlm.model.transformer import Transformer
    from scratchlm.runs import save_run
    from scratchlm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["hello world, hello there"] * 4, vocab_size=270, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=64))
    save_run(run_dir, model, tok, {})
    return model, tok


def test_fresh_interpreter_registry_has_scratchlm_and_lm_evals_own_models():
    """The installed .pth hook registers "scratchlm" lazily without hiding lm_eval's own types."""
    probe = (
        "import sys; from lm_eval.api.registry import get_model; "
        "assert 'scratchlm.eval.lm_eval_adapter' not in sys.modules; "
        "print(get_model('scratchlm').__module__, get_model('dummy').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scratchlm.eval.lm_eval_adapter", "DummyLM"]


@pytest.mark.filterwarnings("ignore::scratchlm.eval.scoring.TruncationWarning")
def test_lm_eval_command_line_runs_model_scratchlm(tmp_path, eval_dir):
    """`lm_eval --model scratchlm --model_args path=RUN` (lm_eval's own console script) scores a
    run dir, and its accuracy equals ours on the same task file."""
    model, tok = tiny_run(tmp_path / "run")
    small = eval_dir / "small"
    tasks = [{"label": "piqa", "file": str(small / "piqa_small.jsonl"), "type": "multiple_choice"}]
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    A.write_harness_tasks(tmp_path / "suite", tmp_path / "harness")
    lm_eval_script = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval_script), "--model", "scratchlm", "--model_args", f"path={tmp_path / 'run'}",
               "--batch_size", "4", "--include_path", str(tmp_path / "harness"), "--tasks", "scratchlm_piqa",
               "--output_path", str(tmp_path / "out")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["scratchlm_piqa"]
    from scratchlm.eval.runner import evaluate

    ours = evaluate(model.eval(), tok, tmp_path / "suite", progress=False)["tasks"]["piqa"]
    assert theirs["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-6)
    assert theirs["acc_norm,none"] == pytest.approx(ours["accuracy_norm"], abs=1e-6)
