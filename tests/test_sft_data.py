"""Fine-tuning data: layouts detected per file, bad rows reported by line, the stdlib defaults."""

from __future__ import annotations

import ast
import json
import textwrap

import pytest

from scratchlm.errors import UserError
from scratchlm.posttrain.data import ReadReport, load_conversations, load_preference_pairs
from scratchlm.posttrain.defaults import (
    CORRUPTIONS,
    builtin_conversations,
    builtin_preference_pairs,
    corrupt,
    stdlib_functions,
)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_messages_and_alpaca_layouts(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Greet.", "input": "", "output": "hi"},
    ])
    report = ReadReport()
    convs = load_conversations([str(chat), str(alpaca)], report=report)
    assert report.layouts == {str(chat): "messages", str(alpaca): "alpaca"}
    assert convs[0][-1] == {"role": "assistant", "content": "a"}
    assert convs[1] == [{"role": "user", "content": "Add.\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert convs[2][0] == {"role": "user", "content": "Greet."}


def test_bad_rows_are_reported_by_line_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        "{not json",
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]},
    ])
    report = ReadReport()
    convs = load_conversations(str(path), report=report)
    assert len(convs) == 2 and report.skipped == 3
    assert [p.split(":")[1] for p in report.problems] == ["2", "3", "4"]
    assert "role" in report.problems[1] and "assistant" in report.problems[2]
    with pytest.raises(UserError, match=r"d\.jsonl:2"):
        load_conversations(str(path), strict=True)


def test_preference_layouts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q?", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q2"}],
         "chosen": [{"role": "assistant", "content": "g2"}],
         "rejected": [{"role": "assistant", "content": "b2"}]},
        {"chosen": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "g3"}],
         "rejected": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "b3"}]},
        {"prompt": "no answers"},
        {"prompt": "x", "chosen": 5, "rejected": "y"},
    ])
    report = ReadReport()
    pairs = load_preference_pairs(str(path), report=report)
    assert len(pairs) == 3 and report.skipped == 2
    assert pairs[0].prompt == [{"role": "user", "content": "q?"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "good"}]
    assert pairs[2].prompt == [{"role": "user", "content": "q3"}]
    assert pairs[2].rejected == [{"role": "assistant", "content": "b3"}]
    assert ":4:" in report.problems[0] and ":5:" in report.problems[1]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_conversations(str(tmp_path / "nope.jsonl"))


@pytest.fixture(scope="module")
def functions():
    return list(stdlib_functions(60))


def test_stdlib_examples_are_real_functions(functions):
    assert len(functions) > 100
    for ex in functions[:200]:
        # signature + body is a function that parses; the docstring is in the instruction
        source = ex.signature + "\n" + textwrap.indent(ex.body, "    ")
        ast.parse(source)
        assert ex.signature in ex.instruction and ex.docstring.splitlines()[0] in ex.instruction


def test_heldout_split_is_disjoint_and_stable(functions):
    train = builtin_conversations("builtin:python-stdlib:files=60")
    held = builtin_conversations("builtin:python-stdlib:files=60:heldout")
    assert held and train and len(train) + len(held) == len(functions)
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in held}
    assert held == builtin_conversations("builtin:python-stdlib:files=60:heldout")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions_are_worse_versions(functions, kind):
    for ex in functions[:80]:
        got_kind, rejected = corrupt(ex, functions, kind)
        assert rejected != ex.body
        if got_kind == "broken_syntax":
            with pytest.raises(SyntaxError):
                ast.parse("def f():\n" + textwrap.indent(rejected, "    "))
        elif got_kind == "truncated":
            assert ex.body.startswith(rejected) and len(rejected) < len(ex.body)


def test_builtin_pairs_use_the_real_body_as_chosen():
    pairs = builtin_preference_pairs("builtin:python-stdlib:files=30")
    examples = {ex.instruction: ex for ex in stdlib_functions(30)}
    assert pairs
    for pair in pairs:
        ex = examples[pair.prompt[0]["content"]]
        assert pair.chosen[0]["content"] == ex.body != pair.rejected[0]["content"]


def test_unknown_builtin_is_a_user_error():
    with pytest.raises(UserError, match="builtin"):
        builtin_conversations("builtin:nonsense")
