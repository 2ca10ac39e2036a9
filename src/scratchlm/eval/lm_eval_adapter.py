"""lm-evaluation-harness adapter: scratchlm models as an `lm_eval` model type, and our task
suites as `lm_eval` tasks, so the two can be run side by side and shown to agree.

- `ScratchLM` (registered as model type "scratchlm" when `lm_eval` is importable) implements
  `loglikelihood`, `loglikelihood_rolling` and `generate_until` on top of the same scoring core
  as our own tasks: contexts follow an EOT token, a context's trailing whitespace moves to the
  continuation, inputs longer than the window keep their end, rolling log-likelihoods use the
  sliding window of `scratchlm.eval.bpb`, generation is greedy and stops at the `until` strings.
- `write_harness_tasks` turns a task suite into lm_eval YAML tasks plus JSONL docs whose
  prompts are ours (few-shot included), so lm_eval's own request building, multiple-choice,
  greedy-match and rolling-loglikelihood logic score them.
- `compare_with_harness` runs both and reports the differences, per task and per example
  (`scratchlm eval --harness`).

`lm_eval` does not discover third-party model types; the `.pth` hook installed with scratchlm
(`scratchlm.lm_eval_plugin`) registers this class lazily, so lm_eval's own command line works:
`lm_eval --model scratchlm --model_args path=RUN --tasks ...` (`python -m
scratchlm.eval.lm_eval_adapter ...` does the same where the hook is not installed).
`lm_eval` is optional: without it, this module imports, and using it raises a clear UserError.
Not for our own scoring (see `scratchlm.eval.tasks`, `scratchlm.eval.bpb`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from scratchlm.errors import UserError
from scratchlm.eval.bpb import rolling_requests
from scratchlm.eval.scoring import DEFAULT_BATCH_SIZE, TruncationWarning, as_scoring_model, score_requests
from scratchlm.eval.tasks import (
    DEFAULT_SEED,
    PairEncoder,
    build_prompt,
    extract_answer,
    gold_answers,
    generate_texts,
    is_number,
    load_examples,
    load_suite,
    select_tasks,
)

try:
    from lm_eval.api.filter import Filter
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_filter, register_model

    HAVE_LM_EVAL = True
except ImportError:  # optional dependency
    LM = object  # type: ignore[assignment,misc]
    Filter = object  # type: ignore[assignment,misc]
    register_filter = register_model = None  # type: ignore[assignment]
    HAVE_LM_EVAL = False

MODEL_NAME = "scratchlm"
TASK_PREFIX = "scratchlm_"
ANSWER_FILTER = "scratchlm_answer"
DEFAULT_MAX_GEN_TOKS = 256


def require_lm_eval() -> None:
    if not HAVE_LM_EVAL:
        raise UserError("lm-evaluation-harness is not installed (pip install lm_eval)")


def _register(decorator_factory, name):
    """Register with lm_eval when it is there; a no-op decorator otherwise."""
    if not HAVE_LM_EVAL:
        return lambda cls: cls
    return decorator_factory(name)


@_register(register_model, MODEL_NAME)
class ScratchLM(LM):
    """A scratchlm model for lm_eval: `ScratchLM(path=RUN)` or `ScratchLM(model=m, tokenizer=t)`.

    `model` is anything `scratchlm.eval.scoring.as_scoring_model` accepts (a Transformer, a
    `ScoringModel`, a hand-built test model); `tokenizer` needs encode/decode/eot_id.
    """

    def __init__(
        self,
        path: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = None,
        device: str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        stride: int | str | None = None,
        progress: bool = True,
        **_ignored: Any,
    ) -> None:
        require_lm_eval()
        super().__init__()
        if path is not None:
            from scratchlm.runs import load_run

            run = load_run(path, device=_usable_device(device))
            model, tokenizer = run.model, run.tokenizer
            if tokenizer is None:
                raise UserError(f"run {path} has no tokenizer/")
        if model is None or tokenizer is None:
            raise UserError("scratchlm lm_eval model needs path=RUN (or model= and tokenizer=)")
        size = int(batch_size) if str(batch_size or "").isdigit() else DEFAULT_BATCH_SIZE
        self.scorer = as_scoring_model(model, batch_size=size)
        self.tokenizer = tokenizer
        self.encoder = PairEncoder(tokenizer)
        self.max_gen_toks = int(max_gen_toks)
        self.stride = int(stride) if stride not in (None, "") else None
        self.progress = progress

    # lm_eval asks these of some models
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"scratchlm-{getattr(self.tokenizer, 'fingerprint', 'tokenizer')}"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum log P(continuation | context), greedy?) for each (context, continuation)."""
        pairs = [self.encoder.encode_pair(*req.args[:2]) for req in requests]
        with _bar(len(pairs), "loglikelihood", disable_tqdm or not self.progress) as bar:
            scores = score_requests(self.scorer, pairs, progress=bar.update, warn_truncation="requests")
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string, every token predicted once after the EOT token."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0])
            for window in rolling_requests(tokens, self.tokenizer.eot_id, self.scorer.max_seq_len, self.stride):
                windows.append(window)
                owner.append(i)
        with _bar(len(windows), "loglikelihood_rolling", disable_tqdm or not self.progress) as bar:
            scores = score_requests(self.scorer, windows, progress=bar.update, warn_truncation=None)
        totals = [0.0] * len(requests)
        for i, score in zip(owner, scores):
            totals[i] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first `until` string."""
        groups: dict[tuple, list[int]] = {}  # requests with the same settings generate together
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((until, max_new), []).append(i)
        outputs: list[str] = [""] * len(requests)
        with _bar(len(requests), "generate_until", disable_tqdm or not self.progress) as bar:
            for (until, max_new), members in groups.items():
                prompts = [self.encoder.encode_context(requests[i].args[0]) for i in members]
                texts = generate_texts(self.scorer, self.tokenizer, prompts, until, max_new)
                for i, (text, _) in zip(members, texts):
                    outputs[i] = text
                bar.update(len(members))
        return outputs


def _usable_device(device: str | None) -> str:
    """The device asked for, or the CPU where it is absent (lm_eval's CLI defaults to cuda)."""
    import torch

    if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    return device


def _bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, leave=False)


@_register(register_filter, ANSWER_FILTER)
class AnswerFilter(Filter):
    """lm_eval filter applying our answer extraction (`scratchlm.eval.tasks.extract_answer`);
    the exported docs carry each answer's kind and the task's CoT delimiter."""

    def apply(self, resps, docs):
        from scratchlm.eval.tasks import TaskSpec

        out = []
        for responses, doc in zip(resps, docs):
            spec = TaskSpec("", Path(), "generation", cot_delimiter=doc["cot_delimiter"])
            out.append([extract_answer(r, spec, doc["numeric"]) for r in responses])
        return out


# ---------------------------------------------------------------------------------------------
# Our suites as lm_eval tasks


def _split_delimiter(text: str) -> tuple[str, str]:
    stripped = text.rstrip()
    return stripped, text[len(stripped):]


def harness_docs(spec, examples: list[dict], limit: int | None, num_fewshot: int | None, seed: int) -> tuple[list[dict], dict]:
    """The docs lm_eval scores for one task (our prompts), and the YAML keys for its type."""
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    n = len(examples) if limit is None else min(limit, len(examples))
    docs = []
    delimiter = " "
    for i in range(n):
        prompt = build_prompt(examples, i, spec, k, seed)
        ex = examples[i]
        if spec.type == "multiple_choice":
            context, delimiter = _split_delimiter(prompt.pairs[0][0])
            docs.append({"context": context, "choices": ex["choices"], "gold": ex["gold"]})
        elif spec.type == "schema":
            contexts = [_split_delimiter(c)[0] for c, _ in prompt.pairs]
            delimiter = _split_delimiter(prompt.pairs[0][0])[1]
            docs.append({"contexts": contexts, "continuation": ex["continuation"], "gold": ex["gold"]})
        elif spec.type == "language_modeling":
            # lm_eval adds no target_delimiter to loglikelihood requests: it goes in the target
            context, delimiter = _split_delimiter(prompt.pairs[0][0])
            docs.append({"context": context, "continuation": delimiter + ex["continuation"]})
        else:
            numeric = is_number(ex["answer"])
            docs.append({
                "context": prompt.generation_prompt,
                "answers": sorted(gold_answers(ex, numeric)),
                "numeric": numeric,
                "cot_delimiter": spec.cot_delimiter,
            })
    # lm_eval puts target_delimiter between context and continuation; the adapter moves any
    # other trailing whitespace itself, exactly as our scorer does.
    config = {
        "multiple_choice": {
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "gold", "target_delimiter": delimiter, "metric_list": ["acc", "acc_norm"],
        },
        "schema": {
            "output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "contexts",
            "doc_to_target": "continuation", "target_delimiter": delimiter, "metric_list": ["acc"],
        },
        "language_modeling": {
            "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
            "metric_list": ["acc"],
        },
        "generation": {
            "output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "answers",
            "target_delimiter": "",
            "generation_kwargs": {"until": list(spec.stop_strings), "max_gen_toks": spec.max_new_tokens, "do_sample": False},
            "filter_list": [{"name": "extract", "filter": [{"function": ANSWER_FILTER}]}],
            "metric_list": ["exact_match"],
        },
    }[spec.type]
    return docs, config


def _yaml_metric(name: str) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def write_harness_tasks(
    tasks_dir: str | Path,
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = DEFAULT_SEED,
    bpb_texts: Sequence[str] | None = None,
) -> list[str]:
    """Write lm_eval task YAMLs (`scratchlm_<label>`) and their docs into `out_dir`; returns the
    task names. `bpb_texts` adds a `scratchlm_bpb` loglikelihood_rolling task over those texts.
    Point lm_eval at them with `--include_path out_dir` (or `TaskManager(include_path=...)`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for spec in select_tasks(load_suite(tasks_dir), labels):
        docs, config = harness_docs(spec, load_examples(spec), limit, num_fewshot, seed)
        name = TASK_PREFIX + spec.label
        config["metric_list"] = [_yaml_metric(m) for m in config["metric_list"]]
        _write_task(out_dir, name, docs, config)
        names.append(name)
    if bpb_texts:
        docs = [{"text": t} for t in bpb_texts]
        config = {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        }
        _write_task(out_dir, TASK_PREFIX + "bpb", docs, config)
        names.append(TASK_PREFIX + "bpb")
    return names


def _write_task(out_dir: Path, name: str, docs: list[dict], config: dict) -> None:
    from scratchlm.files import atomic_write_json, atomic_write_text

    data_file = out_dir / f"{name}.jsonl"
    atomic_write_text(data_file, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "num_fewshot": 0,  # few-shot examples are already in our prompts
        **config,
    }
    # JSON is valid YAML; lm_eval reads *.yaml files.
    atomic_write_json(out_dir / f"{name}.yaml", task)


# ---------------------------------------------------------------------------------------------
# Side by side


HARNESS_METRICS = {"accuracy": "acc", "accuracy_norm": "acc_norm"}


def run_harness(lm: "ScratchLM", task_dir: Path, names: list[str]) -> dict:
    """lm_eval's full results (with per-sample logs) for tasks written by `write_harness_tasks`."""
    require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=True)


def harness_value(task_results: dict, metric: str) -> float | None:
    """A metric from lm_eval's per-task results, whatever filter name it was reported under."""
    for key, value in task_results.items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            return float(value)
    return None


def _harness_per_example(samples: list[dict], metric: str) -> list[bool]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [bool(s[metric]) for s in ordered]


def compare_with_harness(
    model,
    tokenizer,
    tasks_dir: str | Path,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = DEFAULT_SEED,
    bpb_texts: Sequence[str] | None = None,
    work_dir: str | Path | None = None,
    progress: bool = False,
    ours: dict | None = None,
) -> dict:
    """Score the same tasks ourselves (or take `ours`, TaskResults by label, already scored with
    the same settings) and through lm_eval with this adapter.

    Returns `{"tasks": {label: {metric: {"scratchlm", "lm_eval", "diff", "examples_disagree"}}},
    "bpb": {...} (with bpb_texts), "max_diff"}`: max_diff is the largest difference of all.
    """
    import tempfile

    from scratchlm.eval.bpb import bits_per_byte_texts
    from scratchlm.eval.tasks import evaluate_suite_results

    require_lm_eval()
    if ours is None:
        ours = evaluate_suite_results(model, tokenizer, tasks_dir, labels, limit, num_fewshot, seed, progress)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        names = write_harness_tasks(tasks_dir, tmp, labels, limit, num_fewshot, seed, bpb_texts)
        lm = ScratchLM(model=model, tokenizer=tokenizer, progress=progress)
        with warnings.catch_warnings():  # our own run has already said what was truncated
            warnings.simplefilter("ignore", TruncationWarning)
            theirs = run_harness(lm, Path(tmp), names)
    table: dict[str, Any] = {}
    max_diff = 0.0
    for label, result in ours.items():
        name = TASK_PREFIX + label
        rows = {}
        for ours_key, their_key in HARNESS_METRICS.items():
            mine = getattr(result, ours_key)
            if mine is None:
                continue
            if result.type == "generation":
                their_key = "exact_match"
            value = harness_value(theirs["results"][name], their_key)
            diff = abs(mine - value) if value is not None else math.inf
            per_example = result.correct if ours_key == "accuracy" else result.correct_norm
            their_examples = _harness_per_example(theirs["samples"][name], their_key)
            disagree = sum(a != b for a, b in zip(per_example, their_examples)) + abs(len(per_example) - len(their_examples))
            rows[ours_key] = {"scratchlm": mine, "lm_eval": value, "diff": diff, "examples_disagree": disagree}
            max_diff = max(max_diff, diff, float(disagree))
        table[label] = rows
    report: dict[str, Any] = {"tasks": table}
    if bpb_texts:
        mine = bits_per_byte_texts(model, tokenizer, bpb_texts).bpb
        value = harness_value(theirs["results"][TASK_PREFIX + "bpb"], "bits_per_byte")
        diff = abs(mine - value) if value is not None else math.inf
        report["bpb"] = {"scratchlm": mine, "lm_eval": value, "diff": diff}
        max_diff = max(max_diff, diff)
    report["max_diff"] = max_diff
    return report


def main(argv: list[str] | None = None) -> int:
    """The lm_eval command line, with the "scratchlm" model type registered."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    return cli_evaluate() or 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"scratchlm: error: {e}", file=sys.stderr)
        sys.exit(2)
