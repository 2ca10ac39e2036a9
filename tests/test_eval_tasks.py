"""Benchmark task scoring: exact accuracies of a hand-built bigram model, computed here
independently; batching and padding leave scores unchanged; few-shot; bad input."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.eval import tasks as T
from scratchlm.eval.scoring import (
    Request,
    ScoringModel,
    TruncationWarning,
    as_scoring_model,
    score_requests,
)
from scratchlm.eval.toy import EOT_ID, BigramModel, ByteTokenizer, PrefixMeanModel

TOK = ByteTokenizer()


def random_table(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(257, 257, generator=g) * 2


def boost_chain(table: torch.Tensor, text: bytes, amount: float = 60.0) -> None:
    """Make greedy decoding follow `text` byte by byte."""
    for a, b in zip(text, text[1:]):
        table[a, b] += amount


def logp(table: torch.Tensor, prev: int, nxt: int) -> float:
    return float(torch.log_softmax(table[prev].double(), dim=0)[nxt])


def continuation_logprob(table, context: str, continuation: str) -> float:
    """log P(continuation | context) under a bigram table, straight from the definition."""
    ctx = [EOT_ID] + list(context.encode())
    cont = list(continuation.encode())
    seq = ctx + cont
    return sum(logp(table, seq[i - 1], seq[i]) for i in range(len(ctx), len(seq)))


def first_argmax(values):
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def spec_for(path, task_type, **kw):
    return T.TaskSpec(label=path.stem, file=path, type=task_type, **kw)


# ----------------------------------------------------------------------------------------------
# Exact accuracies of the bigram model on the shared small fixtures


@pytest.mark.parametrize("name", ["hellaswag_small", "piqa_small", "mmlu_small"])
def test_bigram_multiple_choice_accuracy_is_exact(eval_dir, name):
    path = eval_dir / "small" / f"{name}.jsonl"
    table = random_table(1)
    model = BigramModel(table, max_seq_len=512)
    expected_raw, expected_norm = [], []
    for ex in read_jsonl(path):
        # 0-shot, delimiter " ": text is query + " " + choice; the space belongs to the choice.
        lls = [continuation_logprob(table, ex["query"], " " + c) for c in ex["choices"]]
        expected_raw.append(first_argmax(lls) == ex["gold"])
        expected_norm.append(first_argmax([ll / len(c) for ll, c in zip(lls, ex["choices"])]) == ex["gold"])
    result = T.evaluate_task(model, TOK, spec_for(path, "multiple_choice"), progress=False)
    assert result.n == len(expected_raw)
    assert result.accuracy == sum(expected_raw) / len(expected_raw)
    assert result.accuracy_norm == sum(expected_norm) / len(expected_norm)
    baseline = sum(1 / len(ex["choices"]) for ex in read_jsonl(path)) / len(expected_raw)
    assert result.centered == pytest.approx((result.accuracy_norm - baseline) / (1 - baseline))


def test_bigram_multiple_choice_discriminates(eval_dir):
    """A model that always prefers " B" scores the fraction of items whose answer is B."""
    path = eval_dir / "small" / "mmlu_small.jsonl"
    examples = read_jsonl(path)
    table = torch.zeros(257, 257)
    table[ord(" "), ord("B")] = 5.0
    result = T.evaluate_task(BigramModel(table, 512), TOK, spec_for(path, "multiple_choice"), progress=False)
    expected = sum(ex["choices"][ex["gold"]] == "B" for ex in examples) / len(examples)
    assert 0 < expected < 1 and result.accuracy == expected == result.accuracy_norm


def test_bigram_schema_accuracy_is_exact(eval_dir):
    path = eval_dir / "small" / "winograd_small.jsonl"
    table = random_table(2)
    expected = []
    for ex in read_jsonl(path):
        lls = [continuation_logprob(table, c, " " + ex["continuation"]) for c in ex["context_options"]]
        expected.append(first_argmax(lls) == ex["gold"])
    result = T.evaluate_task(BigramModel(table, 512), TOK, spec_for(path, "schema"), progress=False)
    assert result.accuracy == sum(expected) / len(expected)
    assert result.accuracy_norm is None


def greedy_reproduces(table, context: str, continuation: str) -> bool:
    seq = [EOT_ID] + list(context.encode()) + list(continuation.encode())
    start = 1 + len(context.encode())
    return all(int(table[seq[i - 1]].argmax()) == seq[i] for i in range(start, len(seq)))


def test_bigram_language_modeling_accuracy_is_exact(eval_dir):
    path = eval_dir / "small" / "lambada_small.jsonl"
    examples = read_jsonl(path)
    table = random_table(3)
    second = examples[1]  # "... not" + " dreaming": no byte repeats, so a bigram can follow it
    boost_chain(table, (second["context"][-1] + " " + second["continuation"]).encode())
    expected = [greedy_reproduces(table, ex["context"], " " + ex["continuation"]) for ex in examples]
    assert expected[1] and 0 < sum(expected) < len(expected)  # the test has teeth
    result = T.evaluate_task(BigramModel(table, 2048), TOK, spec_for(path, "language_modeling"), progress=False)
    assert result.accuracy == sum(expected) / len(expected)


def bigram_greedy_text(table, last_byte: int, max_new: int, stop: str) -> str:
    out, cur = [], last_byte
    for _ in range(max_new):
        cur = int(table[cur].argmax())
        if cur == EOT_ID:
            break
        out.append(cur)
        if stop in bytes(out).decode("utf-8", "replace"):
            break
    return bytes(out).decode("utf-8", "replace").split(stop)[0]


def test_bigram_generation_accuracy_is_exact(eval_dir):
    path = eval_dir / "small" / "gsm8k_small.jsonl"
    examples = read_jsonl(path)
    table = random_table(4)
    boost_chain(table, b": 18\n\n")  # after "A:" the model answers " 18" and stops
    spec = spec_for(path, "generation", continuation_delimiter="\n\nA:", max_new_tokens=12)
    expected = []
    for ex in examples:
        text = bigram_greedy_text(table, ord(":"), 12, "\n\n")
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        expected.append(bool(numbers) and numbers[-1].replace(",", "") == ex["answer"])
    assert 0 < sum(expected) < len(expected)
    result = T.evaluate_task(BigramModel(table, 2048), TOK, spec, progress=False)
    assert result.accuracy == sum(expected) / len(expected)
    assert result.centered == result.accuracy  # open-ended: baseline 0


def test_suite_score_is_mean_centered(tmp_path, eval_dir):
    small = eval_dir / "small"
    tasks = [
        {"label": "piqa", "file": str(small / "piqa_small.jsonl"), "type": "multiple_choice", "random_baseline": 0.5},
        {"label": "wino", "file": str(small / "winograd_small.jsonl"), "type": "schema", "random_baseline": 0.5},
    ]
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    model = BigramModel(random_table(5), 512)
    out = T.evaluate_suite(model, TOK, tmp_path, progress=False)
    centered = [out["tasks"][k]["centered"] for k in ("piqa", "wino")]
    assert out["suite_score"] == pytest.approx(sum(centered) / 2)
    wino = out["tasks"]["wino"]
    assert wino["centered"] == pytest.approx((wino["accuracy"] - 0.5) / 0.5)
    flat = T.quick_eval(model, TOK, tmp_path, ["piqa"], limit=2)
    assert set(flat) == {"eval/piqa", "eval/piqa_centered", "eval/suite_score"}


def test_shared_suite_loads(eval_dir):
    suite = T.load_suite(eval_dir)
    assert suite["arc_easy"].num_fewshot == 3 and suite["arc_easy"].continuation_delimiter == "\nAnswer: "
    assert {s.type for s in suite.values()} == set(T.TASK_TYPES)
    inferred = T.load_suite(eval_dir / "small")
    assert inferred["winograd_small"].type == "schema"
    assert inferred["gsm8k_small"].type == "generation"
    assert inferred["lambada_small"].type == "language_modeling"


# ----------------------------------------------------------------------------------------------
# Batching, padding, few-shot


def test_score_independent_of_padding_and_batch(eval_dir):
    """An item's scores are the same alone, in a batch of mixed lengths, and in any order."""
    model = PrefixMeanModel(max_seq_len=512, seed=1)
    examples = read_jsonl(eval_dir / "small" / "hellaswag_small.jsonl")
    enc = T.PairEncoder(TOK)
    requests = [enc.encode_pair(ex["query"] + " ", c) for ex in examples for c in ex["choices"]]
    alone = [score_requests(ScoringModel(model, 512, batch_size=1), [r])[0] for r in requests]
    batched = score_requests(ScoringModel(model, 512, batch_size=64), requests)
    shuffled_order = list(reversed(range(len(requests))))
    shuffled = score_requests(ScoringModel(model, 512, batch_size=5), [requests[i] for i in shuffled_order])
    for i, a in enumerate(alone):
        # Oracle: one unpadded forward pass over exactly this request's tokens.
        tokens = list(requests[i].context) + list(requests[i].continuation)
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0].double(), -1)
        n = len(requests[i].continuation)
        direct = sum(float(logprobs[p, tokens[p + 1]]) for p in range(len(tokens) - 1 - n, len(tokens) - 1))
        assert a.logprob == pytest.approx(direct, abs=1e-4)
        assert batched[i].logprob == pytest.approx(a.logprob, abs=1e-4)
        assert shuffled[shuffled_order.index(i)].logprob == pytest.approx(a.logprob, abs=1e-4)
        assert batched[i].is_greedy == a.is_greedy and batched[i].n_tokens == n


def test_task_accuracy_independent_of_batch_size(eval_dir):
    model = PrefixMeanModel(max_seq_len=512, seed=2)
    spec = spec_for(eval_dir / "small" / "piqa_small.jsonl", "multiple_choice")
    r1 = T.evaluate_task(ScoringModel(model, 512, batch_size=1), TOK, spec, progress=False)
    r2 = T.evaluate_task(ScoringModel(model, 512, batch_size=16), TOK, spec, progress=False)
    assert (r1.accuracy, r1.accuracy_norm) == (r2.accuracy, r2.accuracy_norm)


def test_transformer_scores_independent_of_batch():
    transformer = pytest.importorskip("scratchlm.model.transformer")
    from scratchlm.model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, d_model=32, max_seq_len=64)
    model = transformer.Transformer(cfg).eval()
    rng = torch.Generator().manual_seed(0)
    requests = [
        Request(torch.randint(0, 256, (int(n),), generator=rng).tolist(), torch.randint(0, 256, (3,), generator=rng).tolist())
        for n in torch.randint(1, 50, (6,), generator=rng)
    ]
    alone = [score_requests(as_scoring_model(model, batch_size=1), [r])[0].logprob for r in requests]
    batched = [s.logprob for s in score_requests(as_scoring_model(model, batch_size=6), requests)]
    assert batched == pytest.approx(alone, abs=1e-4)
    # Oracle: one plain forward pass per request (the scorer runs the head on scored positions only).
    with torch.no_grad():
        for r, got in zip(requests, alone):
            tokens = list(r.context) + list(r.continuation)
            logp = model(torch.tensor([tokens[:-1]]))[0].double().log_softmax(-1)
            n = len(r.continuation)
            expected = sum(float(logp[p, tokens[p + 1]]) for p in range(len(tokens) - 1 - n, len(tokens) - 1))
            assert got == pytest.approx(expected, abs=1e-4)


def test_batched_kv_generation_equals_plain_greedy():
    """The fast path (batched, left-padded, KV cache) generates what the plain loop does."""
    transformer = pytest.importorskip("scratchlm.model.transformer")
    from scratchlm.eval.scoring import generate_batch, greedy_generate
    from scratchlm.model.config import ModelConfig

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, d_model=32, max_seq_len=40)
    scorer = as_scoring_model(transformer.Transformer(cfg), batch_size=4)
    prompts = [list(b"Q: 1+1?\nA:"), list(b"x"), list(b"a much longer prompt that will not fit the window")]
    stops = ("e",)
    fast = generate_batch(scorer, prompts, 12, stop_ids=[EOT_ID], decode=TOK.decode, stop_strings=stops)
    plain = [greedy_generate(scorer, p, 12, [EOT_ID], TOK.decode, stops) for p in prompts]
    assert fast == plain
    assert [t for _, t in fast] == [False, False, True]


def test_fewshot_never_includes_item_and_is_deterministic():
    for n, k in [(2, 1), (5, 3), (100, 10), (4, 10)]:
        for i in range(n):
            picks = T.fewshot_indices(n, i, k, seed=7)
            assert i not in picks and len(set(picks)) == len(picks) == min(k, n - 1)
            assert all(0 <= j < n for j in picks)
            assert picks == T.fewshot_indices(n, i, k, seed=7)
    assert any(T.fewshot_indices(100, i, 3, 1) != T.fewshot_indices(100, i, 3, 2) for i in range(5))


def test_fewshot_prompt_shows_solved_examples(eval_dir):
    path = eval_dir / "small" / "piqa_small.jsonl"
    examples = read_jsonl(path)
    spec = spec_for(path, "multiple_choice", continuation_delimiter="\nAnswer: ")
    prompt = T.build_prompt(examples, 1, spec, k=2, seed=0)
    shots = T.fewshot_indices(len(examples), 1, 2, seed=0)
    prefix = "".join(examples[j]["query"] + "\nAnswer: " + examples[j]["choices"][examples[j]["gold"]] + "\n\n" for j in shots)
    assert [p for p in prompt.pairs] == [(prefix + examples[1]["query"] + "\nAnswer: ", c) for c in examples[1]["choices"]]


def test_pair_encoder_moves_whitespace_and_prefixes_eot():
    r = T.PairEncoder(TOK).encode_pair("Q: x\nAnswer: ", "Paris")
    assert r.context == [EOT_ID] + list(b"Q: x\nAnswer:")
    assert r.continuation == list(b" Paris")


def test_answer_extraction():
    spec = T.TaskSpec("g", None, "generation")
    assert T.extract_answer(" so 3+4=7 #### 1,234.", spec, numeric=True) == "1234"
    assert T.extract_answer(" The answer is $18.00 dollars", spec, numeric=True) == "18"
    assert T.extract_answer(" no number", spec, numeric=True) == ""
    ex = {"answer": "Sunset Boulevard", "aliases": ["Sunset Blvd"]}
    assert T.extract_answer(" the Sunset Blvd.\nmore", spec, numeric=False) in T.gold_answers(ex, numeric=False)


# ----------------------------------------------------------------------------------------------
# Bad input


def write_task(tmp_path, lines, task_type="multiple_choice"):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x for x in lines))
    return spec_for(path, task_type)


def test_missing_field_names_file_line_and_field(tmp_path):
    spec = write_task(tmp_path, [{"query": "a", "choices": ["x", "y"], "gold": 0}, {"query": "b", "choices": ["x", "y"]}])
    with pytest.raises(UserError, match=r"task\.jsonl:2: missing field 'gold'"):
        T.load_examples(spec)


def test_out_of_range_gold(tmp_path):
    spec = write_task(tmp_path, [{"query": "a", "choices": ["x", "y"], "gold": 2}])
    with pytest.raises(UserError, match=r"task\.jsonl:1: gold 2 is out of range for 2 choices"):
        T.load_examples(spec)
    spec = write_task(tmp_path, [{"context_options": ["a", "b"], "continuation": "c", "gold": -1}], "schema")
    with pytest.raises(UserError, match=r"gold -1 is out of range"):
        T.load_examples(spec)


def test_empty_file_and_bad_json(tmp_path):
    with pytest.raises(UserError, match=r"task\.jsonl: empty task file"):
        T.load_examples(write_task(tmp_path, ["\n"]))
    with pytest.raises(UserError, match=r"task\.jsonl:1: not valid JSON"):
        T.load_examples(write_task(tmp_path, ["{oops\n"]))


def test_bad_tasks_json(tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"label": "x", "file": "x.jsonl", "type": "essay"}]}))
    with pytest.raises(UserError, match=r"tasks\[0\]: type 'essay'"):
        T.load_suite(tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"label": "x", "type": "schema"}]}))
    with pytest.raises(UserError, match=r"missing field 'file'"):
        T.load_suite(tmp_path)
    with pytest.raises(UserError, match=r"unknown task\(s\): nope"):
        T.select_tasks({"a": None}, ["nope"])


def test_context_longer_than_window_is_truncated_left_and_said_once(tmp_path):
    long_query = "word " * 100
    lines = [{"query": long_query + str(i), "choices": [" a", " b"], "gold": 0} for i in range(5)]
    lines.append({"query": "short", "choices": [" a", " b"], "gold": 1})
    spec = write_task(tmp_path, lines)
    table = random_table(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = T.evaluate_task(BigramModel(table, max_seq_len=32), TOK, spec, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(messages) == 1 and "5 of 6 examples" in messages[0] and "truncated from the left" in messages[0]
    assert result.truncated == 5
    # Truncation keeps the end: the bigram model's choice depends only on the last context byte.
    expected = [first_argmax([continuation_logprob(table, x["query"], " " + c) for c in x["choices"]]) == x["gold"] for x in lines]
    assert result.accuracy == sum(expected) / len(expected)


def test_truncation_keeps_the_last_window_tokens():
    model = PrefixMeanModel(max_seq_len=8)
    request = Request(list(range(20)), [30, 31, 32])
    with pytest.warns(TruncationWarning):
        (score,) = score_requests(ScoringModel(model, 8), [request])
    kept = (list(range(20)) + [30, 31, 32])[-9:]
    logprobs = torch.log_softmax(model(torch.tensor([kept[:-1]]))[0].double(), -1)
    direct = sum(float(logprobs[p, kept[p + 1]]) for p in range(5, 8))
    assert score.truncated and score.n_tokens == 3 and score.logprob == pytest.approx(direct, abs=1e-5)
    assert not math.isnan(score.logprob)
