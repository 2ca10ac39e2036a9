"""`scratchlm compare`: equal budgets honoured, the report and its table, interleaving, the
variants file's errors, and the statistics (Welch's t-test p-values against closed forms and a
numerical integral of Student's t density)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_train_support import corpus_texts, make_dataset, one_thread, train_tokenizer

from scratchlm.compare import (Variant, compare, load_variants, loss_stability, parse_budget,
                               plan_runs, regularized_incomplete_beta, student_t_two_sided_p,
                               welch_t_test)
from scratchlm.errors import UserError

TINY_BASE = """
[base]
"model.preset" = "gpt2-tiny"
"model.n_layer" = 1
"model.d_model" = 32
"model.n_head" = 2
"train.seq_len" = 32
"train.micro_batch_size" = 4
"train.eval_batches" = 2
"train.dtype" = "fp32"
"train.lr" = 3e-3
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    texts = corpus_texts(60_000)
    return make_dataset(tmp_path_factory.mktemp("ds"), train_tokenizer(texts, 300), texts)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def write_variants(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# End to end


def test_minutes_budget_two_variants_two_seeds(dataset, tmp_path):
    variants = write_variants(tmp_path / "v.toml", TINY_BASE + """
[variants.pre]
"model.norm_position" = "pre"
[variants.post]
"model.norm_position" = "post"
""")
    budget = parse_budget("0.05")  # 3 seconds a run
    result = compare(dataset, budget, variants, tmp_path / "out", seeds=2, progress=False)

    main = [r for r in result.runs if not r["sweep"]]
    assert len(main) == 4
    for r in main:  # the equal-budget property: every run's seconds within 5% of the budget
        assert abs(r["seconds"] - 3.0) / 3.0 < 0.05, r
        assert r["tokens"] > 0 and r["final_bpb"] is not None and math.isfinite(r["final_bpb"])
    # interleaved: seed 0 as listed, seed 1 reversed
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["order"] == ["pre-s0", "post-s0", "post-s1", "pre-s1"]

    report = result.report.read_text()
    table = _table_rows(report, "| variant | params")
    assert [row[0] for row in table] == ["pre", "post"]
    pre, post = result.summary
    assert pre["bpb_mean"] == pytest.approx(np.mean([r["final_bpb"] for r in main if r["variant"] == "pre"]))
    assert pre["bpb_std"] == pytest.approx(np.std([r["final_bpb"] for r in main if r["variant"] == "pre"], ddof=1))
    # the table's p-value is Welch's test of the per-seed final bpbs against the first variant
    expected = welch_t_test(post["bpb_values"], pre["bpb_values"])
    assert post["p"] == pytest.approx(expected[2])
    assert float(table[1][-1]) == pytest.approx(post["p"], rel=1e-3)
    assert "Welch" in report and "significant" in report
    for axis in ("tokens", "flops", "seconds"):
        png = tmp_path / "out" / f"bpb_vs_{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"bpb_vs_{axis}.png" in report
    # each run's curve is val bpb at increasing tokens, FLOPs and seconds
    curve = main[0]["curve"]
    assert len(curve) >= 2 and all(a["tokens"] < b["tokens"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["flops"] == pytest.approx(curve[-1]["tokens"] * main[0]["flops_per_token"])


def test_flops_budget_sweep_and_extrapolation(dataset, tmp_path):
    variants = write_variants(tmp_path / "v.toml", """
[compare]
lr_sweep = [3e-3, 3e-2]
extrapolation = [1, 2]
""" + TINY_BASE + """
[variants.rope]
"model.positions" = "rope"
[variants.learned]
"model.positions" = "learned"
"model.max_seq_len" = 32
""")
    budget = parse_budget("5e8", "flops")  # 27 steps of 128 tokens
    result = compare(dataset, budget, variants, tmp_path / "out", seeds=1, progress=False)
    for r in result.runs:  # FLOPs within 5% of the budget (the run stops at the nearest step)
        assert abs(r["flops"] - 5e8) / 5e8 < 0.05, r
    rope, learned = result.summary
    # rope evaluates at 2x its training context; the learned table has no rows there
    assert rope["extrapolation"]["2"] is not None and learned["extrapolation"]["2"] is None
    assert rope["extrapolation"]["1"] == pytest.approx(rope["bpb_mean"])
    sweep = [r for r in result.runs if r["sweep"]]
    assert sorted((r["variant"], r["lr"]) for r in sweep) == [
        ("learned", 3e-3), ("learned", 3e-2), ("rope", 3e-3), ("rope", 3e-2)]
    # the sweep point at the base lr is the seed-0 run itself, not trained twice
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 4
    report = result.report.read_text()
    assert "Learning-rate sweep" in report and "Length extrapolation" in report
    assert result.summary[1]["p"] is None and "needs 2+ seeds" in report


def test_flops_budget_too_small_is_a_user_error(dataset, tmp_path):
    variants = write_variants(tmp_path / "v.toml", TINY_BASE + """
[variants.a]
"model.activation" = "relu"
[variants.b]
"model.activation" = "gelu"
""")
    with pytest.raises(UserError, match="optimizer steps"):
        compare(dataset, parse_budget("1e6", "flops"), variants, tmp_path / "out", seeds=1, progress=False)


# ---------------------------------------------------------------------------------------------
# Plan, variants file, stability


def test_plan_interleaves_variants_across_seeds():
    variants = [Variant(n, {}) for n in "abc"]
    plan = plan_runs(variants, seeds=4, lr_sweep=[1e-3])
    main = [(r.variant.name, r.seed) for r in plan if r.lr is None]
    for seed in range(4):  # every seed block holds every variant once, before the next seed
        block = main[3 * seed:3 * seed + 3]
        assert {s for _, s in block} == {seed} and sorted(n for n, _ in block) == ["a", "b", "c"]
    assert [n for n, _ in main[:6]] == ["a", "b", "c", "c", "b", "a"]
    assert [r.name for r in plan if r.lr is not None] == ["a-lr0.001-s0", "b-lr0.001-s0", "c-lr0.001-s0"]


@pytest.mark.parametrize("text, message", [
    ("[variants.a]\n\"model.norm_position\" = \"pre\"\n", "at least two"),
    ("[variants.a]\n\"model.norm_positon\" = \"pre\"\n[variants.b]\n\"model.bias\" = true\n",
     "norm_positon"),
    ("[variants.a]\n\"train.lr\" = \"fast\"\n[variants.b]\n\"train.lr\" = 1.0\n", "train.lr"),
    ("[variants.a]\nlr = 1.0\n[variants.b]\n\"train.lr\" = 1.0\n", "section.key"),
    ("[compare]\nseeds = 3\n[variants.a]\n\"train.lr\" = 1.0\n[variants.b]\n\"train.lr\" = 1.0\n", "seeds"),
    ("[compare]\nlr_sweep = [0]\n[variants.a]\n\"train.lr\" = 1.0\n[variants.b]\n\"train.lr\" = 1.0\n",
     "lr_sweep"),
])
def test_bad_variants_files_name_the_problem(tmp_path, text, message):
    path = write_variants(tmp_path / "bad.toml", text)
    with pytest.raises(UserError, match=message):
        load_variants(path)


def test_ready_made_variants_files_load():
    here = Path(__file__).resolve().parents[1] / "configs" / "compare"
    names = {p.stem for p in here.glob("*.toml")}
    assert {"norm-placement", "positions", "activations", "attention-heads", "optimizers",
            "presets"} <= names
    for name in names:
        assert len(load_variants(name).variants) >= 2


def test_bad_budget_is_a_user_error():
    for text, unit in (("soon", "minutes"), ("-1", "minutes"), ("1", "hours")):
        with pytest.raises(UserError):
            parse_budget(text, unit)


def test_loss_spikes_are_counted_after_warmup():
    losses = [5.0, 4.0, 3.0, 3.9, 4.0, 2.9, 2.8, 10.0, 2.7]
    records = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    st = loss_stability(records, warmup_steps=1)
    assert st["spikes"] == 2  # 3.9-4.0 (one run of steps) and 10.0
    assert st["max_rise"] == pytest.approx(10.0 / 2.8)
    assert loss_stability(records, warmup_steps=100)["spikes"] == 0


# ---------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0])
def test_t_test_p_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution, df = 2 has a closed-form CDF too
    assert student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-10)
    assert student_t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-10)
    assert student_t_two_sided_p(t, 1e7) == pytest.approx(math.erfc(abs(t) / math.sqrt(2)), abs=1e-5)


@pytest.mark.parametrize("t, df", [(2.3, 5.0), (0.7, 3.4), (4.0, 11.0)])
def test_t_test_p_matches_integrated_density(t, df):
    x = np.linspace(abs(t), 2000.0, 2_000_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    tail = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
    assert student_t_two_sided_p(t, df) == pytest.approx(2 * tail, rel=1e-3)


def test_incomplete_beta_symmetry_and_bounds():
    for x, a, b in ((0.2, 2.0, 3.0), (0.9, 0.5, 7.0), (0.5, 4.0, 4.0)):
        assert regularized_incomplete_beta(x, a, b) == pytest.approx(
            1 - regularized_incomplete_beta(1 - x, b, a), abs=1e-12)
    assert regularized_incomplete_beta(0.5, 4.0, 4.0) == pytest.approx(0.5)
    # I_x(1, b) = 1 - (1 - x)^b
    assert regularized_incomplete_beta(0.3, 1.0, 2.5) == pytest.approx(1 - 0.7**2.5)


def test_welch_statistic_and_degrees_of_freedom():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.5]
    t, df, p = welch_t_test(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    assert t == pytest.approx((np.mean(a) - np.mean(b)) / math.sqrt(va + vb))
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 2))
    assert welch_t_test(b, a)[2] == pytest.approx(p)  # symmetric
    assert welch_t_test([1.0], b) is None
    assert welch_t_test([1.0, 1.0], [2.0, 2.0])[2] == 0.0  # no noise, different means


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows
