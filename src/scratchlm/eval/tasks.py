"""CORE-style benchmark tasks: load a task suite, build few-shot prompts, score, aggregate.

A suite is a directory with a `tasks.json` (`{"tasks": [{label, file, type, num_fewshot,
continuation_delimiter, random_baseline, ...}]}`) and one JSONL file per task, the layout of the
DCLM "CORE" suite (see docs/eval.md). Four task types:

- multiple_choice `{query, choices, gold}`: the choice whose continuation is most likely.
  `accuracy` uses the total log-likelihood, `accuracy_norm` divides it by the choice's length in
  characters (lm-evaluation-harness's `acc` and `acc_norm`).
- schema `{context_options, continuation, gold}`: the context under which the shared
  continuation is most likely.
- language_modeling `{context, continuation}`: correct when greedy decoding reproduces every
  continuation token.
- generation `{context, answer, chain_of_thought?, aliases?}`: greedy generation until a stop
  string, then exact match of the extracted answer (the final number for numeric answers).

Few-shot examples come from the same file, never the item itself, drawn deterministically from
the seed and the item's index. Centered accuracy is (accuracy - random_baseline) /
(1 - random_baseline), and a suite's score is the mean centered accuracy of its tasks.
Not for bits per byte (see `scratchlm.eval.bpb`) nor for the forward pass (see
`scratchlm.eval.scoring`).
"""

from __future__ import annotations

import json
import random
import re
import string
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scratchlm.errors import UserError
from scratchlm.eval.scoring import (
    Request,
    ScoringModel,
    TruncationWarning,
    as_scoring_model,
    cut_at_stop,
    generate_batch,
    score_requests,
)
from scratchlm.files import read_json

TASK_TYPES = ("multiple_choice", "schema", "language_modeling", "generation")
REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
    "generation": ("context", "answer"),
}
FEWSHOT_SEPARATOR = "\n\n"
DEFAULT_SEED = 1234
DEFAULT_STOP_STRINGS = ("\n\n",)
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_COT_DELIMITER = " #### "


@dataclass
class TaskSpec:
    """One task of a suite, as `tasks.json` describes it."""

    label: str
    file: Path
    type: str
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float | None = None  # None: mean of 1/len(choices) (0 for open-ended types)
    stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    cot_delimiter: str = DEFAULT_COT_DELIMITER


# ---------------------------------------------------------------------------------------------
# Loading and validating


def load_suite(tasks_dir: str | Path) -> dict[str, TaskSpec]:
    """The tasks of a suite directory, by label, in the order `tasks.json` lists them.

    A directory without `tasks.json` is read as one task per `*.jsonl` file, labelled by the
    file name, its type told from the fields of its first line, zero-shot.
    """
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise UserError(f"tasks directory not found: {tasks_dir}")
    index = tasks_dir / "tasks.json"
    if not index.exists():
        return _infer_suite(tasks_dir)
    data = read_json(index, "task list")
    entries = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise UserError(f"{index}: expected {{\"tasks\": [...]}}")
    suite = {}
    for i, entry in enumerate(entries):
        spec = _spec_from_entry(entry, tasks_dir, f"{index}: tasks[{i}]")
        suite[spec.label] = spec
    return suite


def _spec_from_entry(entry: Any, tasks_dir: Path, where: str) -> TaskSpec:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object")
    for name in ("label", "file", "type"):
        if name not in entry:
            raise UserError(f"{where}: missing field '{name}'")
    if entry["type"] not in TASK_TYPES:
        raise UserError(f"{where}: type {entry['type']!r} is not one of {', '.join(TASK_TYPES)}")
    spec = TaskSpec(label=str(entry["label"]), file=tasks_dir / entry["file"], type=entry["type"])
    for name in ("num_fewshot", "max_new_tokens"):
        if name in entry:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{where}: {name} must be a non-negative integer, got {value!r}")
            setattr(spec, name, value)
    for name in ("continuation_delimiter", "cot_delimiter"):
        if name in entry:
            if not isinstance(entry[name], str):
                raise UserError(f"{where}: {name} must be a string")
            setattr(spec, name, entry[name])
    if "random_baseline" in entry:
        value = entry["random_baseline"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"{where}: random_baseline must be a number in [0, 1), got {value!r}")
        spec.random_baseline = float(value)
    if "stop_strings" in entry:
        stops = entry["stop_strings"]
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise UserError(f"{where}: stop_strings must be a list of non-empty strings")
        spec.stop_strings = tuple(stops)
    return spec


def _infer_suite(tasks_dir: Path) -> dict[str, TaskSpec]:
    files = sorted(tasks_dir.glob("*.jsonl"))
    if not files:
        raise UserError(f"{tasks_dir}: no tasks.json and no *.jsonl task files")
    suite = {}
    for path in files:
        first = _first_record(path)
        task_type = next(
            (t for t in TASK_TYPES if all(f in first for f in REQUIRED_FIELDS[t])), None
        )
        if task_type is None:
            raise UserError(f"{path}:1: cannot tell the task type from fields {sorted(first)}")
        suite[path.stem] = TaskSpec(label=path.stem, file=path, type=task_type)
    return suite


def _first_record(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                return _parse_line(line, path, lineno)
    raise UserError(f"{path}: empty task file (no examples)")


def _parse_line(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object")
    return record


def load_examples(spec: TaskSpec) -> list[dict]:
    """Every example of a task file, validated for the task's type (UserError naming file:line)."""
    try:
        f = open(spec.file, encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"task {spec.label}: file not found: {spec.file}") from None
    except UnicodeDecodeError:
        raise UserError(f"task {spec.label}: not valid UTF-8: {spec.file}") from None
    examples = []
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_line(line, spec.file, lineno)
            _validate(record, spec.type, f"{spec.file}:{lineno}")
            examples.append(record)
    if not examples:
        raise UserError(f"{spec.file}: empty task file (no examples)")
    return examples


def _validate(record: dict, task_type: str, where: str) -> None:
    for name in REQUIRED_FIELDS[task_type]:
        if name not in record:
            need = ", ".join(REQUIRED_FIELDS[task_type])
            raise UserError(f"{where}: missing field '{name}' ({task_type} needs {need})")
    if task_type in ("multiple_choice", "schema"):
        options_field = "choices" if task_type == "multiple_choice" else "context_options"
        options = record[options_field]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise UserError(f"{where}: field '{options_field}' must be a list of at least 2 strings")
        gold = record["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise UserError(f"{where}: field 'gold' must be an integer index, got {gold!r}")
        if not 0 <= gold < len(options):
            raise UserError(
                f"{where}: gold {gold} is out of range for {len(options)} {options_field} (0..{len(options) - 1})"
            )
    text_fields = {
        "multiple_choice": ("query",),
        "schema": ("continuation",),
        "language_modeling": ("context", "continuation"),
        "generation": ("context", "answer"),
    }[task_type]
    for name in text_fields:
        if not isinstance(record[name], str):
            raise UserError(f"{where}: field '{name}' must be a string")
    if task_type == "language_modeling" and not record["continuation"]:
        raise UserError(f"{where}: field 'continuation' is empty")


def random_baseline(spec: TaskSpec, examples: Sequence[dict]) -> float:
    if spec.random_baseline is not None:
        return spec.random_baseline
    if spec.type == "multiple_choice":
        return sum(1 / len(e["choices"]) for e in examples) / len(examples)
    if spec.type == "schema":
        return sum(1 / len(e["context_options"]) for e in examples) / len(examples)
    return 0.0


# ---------------------------------------------------------------------------------------------
# Prompts


def fewshot_indices(n_examples: int, index: int, k: int, seed: int = DEFAULT_SEED) -> list[int]:
    """k distinct example indices other than `index`, the same for the same (seed, index)."""
    k = min(k, n_examples - 1)
    if k <= 0:
        return []
    rng = random.Random(f"{seed}:{index}")
    picks = rng.sample(range(n_examples - 1), k)
    return [j + 1 if j >= index else j for j in picks]  # skip the item itself


def _answer_text(example: dict, spec: TaskSpec) -> str:
    """What a generation few-shot example shows after the delimiter."""
    cot = example.get("chain_of_thought")
    body = f"{cot}{spec.cot_delimiter}{example['answer']}" if cot else example["answer"]
    return body if spec.continuation_delimiter[-1:].isspace() else " " + body


def demonstration(example: dict, spec: TaskSpec) -> str:
    """One solved example, as a few-shot prompt shows it."""
    d = spec.continuation_delimiter
    if spec.type == "multiple_choice":
        return example["query"] + d + example["choices"][example["gold"]]
    if spec.type == "schema":
        return example["context_options"][example["gold"]] + d + example["continuation"]
    if spec.type == "language_modeling":
        return example["context"] + d + example["continuation"]
    return example["context"] + d + _answer_text(example, spec)


def fewshot_prefix(examples: Sequence[dict], index: int, spec: TaskSpec, k: int, seed: int) -> str:
    shots = fewshot_indices(len(examples), index, k, seed)
    return "".join(demonstration(examples[j], spec) + FEWSHOT_SEPARATOR for j in shots)


@dataclass
class Prompt:
    """The text pairs one example is scored on: [(context, continuation)] or a generation prompt."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    generation_prompt: str = ""


def build_prompt(examples: Sequence[dict], index: int, spec: TaskSpec, k: int, seed: int) -> Prompt:
    example = examples[index]
    prefix = fewshot_prefix(examples, index, spec, k, seed)
    d = spec.continuation_delimiter
    if spec.type == "multiple_choice":
        return Prompt(pairs=[(prefix + example["query"] + d, c) for c in example["choices"]])
    if spec.type == "schema":
        return Prompt(pairs=[(prefix + c + d, example["continuation"]) for c in example["context_options"]])
    if spec.type == "language_modeling":
        return Prompt(pairs=[(prefix + example["context"] + d, example["continuation"])])
    return Prompt(generation_prompt=prefix + example["context"] + d)


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation: ("Answer: ", "Paris") ->
    ("Answer:", " Paris"). Byte-level BPE attaches a space to the word after it, so this is how
    the text tokenizes when written out whole (lm-evaluation-harness does the same)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


class PairEncoder:
    """Turns (context, continuation) text into a scoring `Request`, the one way everyone does.

    The context is prefixed with the EOT token (documents follow one in training) and its
    trailing whitespace moves to the continuation. The continuation's tokens are those the whole
    text has after the context's tokens; if BPE merged across the boundary, the two halves are
    encoded separately instead, so the continuation is always scored as exactly its own text.
    """

    def __init__(self, tokenizer, prefix_eot: bool = True):
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.eot_id] if prefix_eot else []
        self._context_cache: dict[str, list[int]] = {}

    def encode_context(self, text: str) -> list[int]:
        ids = self._context_cache.get(text)
        if ids is None:
            ids = self.prefix + list(self.tokenizer.encode(text)) if text else list(self.prefix)
            if len(self._context_cache) > 4096:
                self._context_cache.clear()
            self._context_cache[text] = ids
        return ids

    def encode_pair(self, context: str, continuation: str) -> Request:
        context, continuation = move_trailing_whitespace(context, continuation)
        context_ids = self.encode_context(context)
        if not context_ids:  # no EOT prefix and no context: nothing to condition on
            raise ValueError("empty context and no EOT prefix")
        whole = self.prefix + list(self.tokenizer.encode(context + continuation))
        if whole[: len(context_ids)] == context_ids:
            return Request(context_ids, whole[len(context_ids):])
        return Request(context_ids, list(self.tokenizer.encode(continuation)))


# ---------------------------------------------------------------------------------------------
# Answers of generation tasks

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_number(text: str) -> str:
    text = text.replace(",", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip().replace("$", "")) is not None


def normalize_text(text: str) -> str:
    """SQuAD-style: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(generation: str, spec: TaskSpec, numeric: bool) -> str:
    """The answer a generation gives: text after the last CoT delimiter if any, then the final
    number (numeric answers) or the first line (text answers), normalised for comparison."""
    text = generation
    marker = spec.cot_delimiter.strip()
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    if numeric:
        numbers = _NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else ""
    lines = text.strip().splitlines()
    return normalize_text(lines[0]) if lines else ""


def gold_answers(example: dict, numeric: bool) -> set[str]:
    answers = [example["answer"]] + [a for a in example.get("aliases", []) if isinstance(a, str)]
    if numeric:
        return {normalize_number(a.strip().replace("$", "")) for a in answers}
    return {normalize_text(a) for a in answers}


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class TaskResult:
    label: str
    type: str
    accuracy: float
    accuracy_norm: float | None
    centered: float
    n: int
    seconds: float
    truncated: int = 0
    random_baseline: float = 0.0
    correct: list[bool] = field(default_factory=list, repr=False)  # per example
    correct_norm: list[bool] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {"accuracy": self.accuracy}
        if self.accuracy_norm is not None:
            d["accuracy_norm"] = self.accuracy_norm
        d.update(centered=self.centered, n=self.n, seconds=round(self.seconds, 3))
        d.update(type=self.type, random_baseline=self.random_baseline, truncated=self.truncated)
        return d


def centered_accuracy(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on a tie (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_task(
    model,
    tokenizer,
    spec: TaskSpec,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    examples: list[dict] | None = None,
) -> TaskResult:
    """Score one task on its first `limit` examples (all by default)."""
    scorer = as_scoring_model(model)
    start = time.perf_counter()
    examples = load_examples(spec) if examples is None else examples
    items = range(len(examples) if limit is None else min(limit, len(examples)))
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    prompts = [build_prompt(examples, i, spec, k, seed) for i in items]
    if spec.type == "generation":
        correct, norm_correct, truncated = _score_generation(scorer, tokenizer, spec, examples, prompts, progress)
    else:
        correct, norm_correct, truncated = _score_likelihood(scorer, tokenizer, spec, examples, prompts, progress)
    if truncated:
        warnings.warn(
            f"{spec.label}: {truncated} of {len(prompts)} examples are longer than the model's "
            f"window ({scorer.max_seq_len} tokens); truncated from the left",
            TruncationWarning,
            stacklevel=2,
        )
    n = len(prompts)
    accuracy = sum(correct) / n
    accuracy_norm = sum(norm_correct) / n if norm_correct is not None else None
    baseline = random_baseline(spec, examples[:n])
    primary = accuracy_norm if accuracy_norm is not None else accuracy
    return TaskResult(
        label=spec.label,
        type=spec.type,
        accuracy=accuracy,
        accuracy_norm=accuracy_norm,
        centered=centered_accuracy(primary, baseline),
        n=n,
        seconds=time.perf_counter() - start,
        truncated=truncated,
        random_baseline=baseline,
        correct=[bool(c) for c in correct],
        correct_norm=[bool(c) for c in norm_correct] if norm_correct is not None else None,
    )


def _progress_bar(total: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="req", disable=not enabled, leave=False)


def _score_likelihood(scorer: ScoringModel, tokenizer, spec, examples, prompts, progress):
    encoder = PairEncoder(tokenizer)
    requests = [encoder.encode_pair(c, x) for p in prompts for c, x in p.pairs]
    with _progress_bar(len(requests), spec.label, progress) as bar:
        scores = score_requests(scorer, requests, progress=bar.update, warn_truncation=None)
    correct, norm_correct, truncated = [], [], 0
    cursor = 0
    for i, prompt in enumerate(prompts):
        item = scores[cursor : cursor + len(prompt.pairs)]
        cursor += len(prompt.pairs)
        truncated += any(s.truncated for s in item)
        example = examples[i]
        if spec.type == "language_modeling":
            correct.append(item[0].is_greedy)
            continue
        logprobs = [s.logprob for s in item]
        correct.append(argmax(logprobs) == example["gold"])
        if spec.type == "multiple_choice":
            lengths = [max(len(c), 1) for c in example["choices"]]
            norm_correct.append(argmax([lp / n for lp, n in zip(logprobs, lengths)]) == example["gold"])
    return correct, (norm_correct if spec.type == "multiple_choice" else None), truncated


def _score_generation(scorer: ScoringModel, tokenizer, spec, examples, prompts, progress):
    encoder = PairEncoder(tokenizer)
    correct, truncated = [], 0
    with _progress_bar(len(prompts), spec.label, progress) as bar:
        for start in range(0, len(prompts), scorer.batch_size):
            chunk = prompts[start : start + scorer.batch_size]
            ids = [encoder.encode_context(p.generation_prompt) for p in chunk]
            outputs = generate_texts(scorer, tokenizer, ids, spec.stop_strings, spec.max_new_tokens)
            for i, (text, was_truncated) in enumerate(outputs, start=start):
                truncated += was_truncated
                numeric = is_number(examples[i]["answer"])
                correct.append(extract_answer(text, spec, numeric) in gold_answers(examples[i], numeric))
            bar.update(len(chunk))
    return correct, None, truncated


def generate_texts(
    scorer: ScoringModel, tokenizer, prompts: Sequence[list[int]], stop_strings: Sequence[str], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """Greedy text after each prompt, cut at the first stop string, and whether the prompt had
    to lose tokens on the left to leave room for `max_new_tokens` in the window."""
    outputs = generate_batch(
        scorer,
        prompts,
        max_new_tokens,
        stop_ids=[tokenizer.eot_id],
        decode=tokenizer.decode,
        stop_strings=stop_strings,
    )
    return [(cut_at_stop(tokenizer.decode(ids), stop_strings), truncated) for ids, truncated in outputs]


# ---------------------------------------------------------------------------------------------
# Suites


def select_tasks(suite: dict[str, TaskSpec], labels: Sequence[str] | None) -> list[TaskSpec]:
    if not labels:
        return list(suite.values())
    unknown = [label for label in labels if label not in suite]
    if unknown:
        raise UserError(f"unknown task(s): {', '.join(unknown)}; available: {', '.join(suite)}")
    return [suite[label] for label in labels]


def suite_score(results: dict[str, TaskResult]) -> float:
    return sum(r.centered for r in results.values()) / len(results) if results else 0.0


def evaluate_suite(
    model,
    tokenizer,
    tasks_dir: str | Path,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> dict:
    """`{"tasks": {label: TaskResult.to_dict()}, "suite_score": mean centered accuracy}`."""
    results = evaluate_suite_results(model, tokenizer, tasks_dir, labels, limit, num_fewshot, seed, progress)
    return {"tasks": {k: r.to_dict() for k, r in results.items()}, "suite_score": suite_score(results)}


def evaluate_suite_results(
    model,
    tokenizer,
    tasks_dir: str | Path,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """Like `evaluate_suite`, but the `TaskResult`s themselves (with per-example results)."""
    specs = select_tasks(load_suite(tasks_dir), labels)
    scorer = as_scoring_model(model)
    return {spec.label: evaluate_task(scorer, tokenizer, spec, limit, num_fewshot, seed, progress) for spec in specs}


def quick_eval(model, tokenizer, tasks_dir: str | Path, labels: Sequence[str] | None = None, limit: int | None = 100) -> dict:
    """A small fixed subset, for logging during training: a flat dict of floats.

    Keys: `eval/<label>` (accuracy), `eval/<label>_centered`, and `eval/suite_score`. The
    model is put in eval mode for the call and given back in the mode it came in.
    """
    was_training = getattr(model, "training", False)
    try:
        results = evaluate_suite(model, tokenizer, tasks_dir, labels, limit=limit, progress=False)
    finally:
        if was_training:
            model.train()
    flat = {}
    for label, r in results["tasks"].items():
        flat[f"eval/{label}"] = r["accuracy"]
        flat[f"eval/{label}_centered"] = r["centered"]
    flat["eval/suite_score"] = results["suite_score"]
    return flat
