"""One evaluation of a model: benchmark tasks and bits per byte together, as `scratchlm eval` runs
it, with the results JSON and the table it prints.

Not for the scoring itself (see `scratchlm.eval.tasks`, `scratchlm.eval.bpb`) nor for argument
parsing (see `scratchlm.eval.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scratchlm.errors import UserError


def evaluate(
    model,
    tokenizer,
    tasks_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    bpb_source: str | None = None,
    bpb_stride: int | None = None,
    bpb_max_documents: int | None = None,
    seed: int = 1234,
    progress: bool = True,
    harness: bool = False,
) -> dict:
    """`{"tasks": {...}, "suite_score": x}` (with tasks_dir) plus `"bpb"`, `"bpb_detail"` (with
    bpb_source); see `scratchlm.eval.tasks.evaluate_suite`. With `harness`, also `"harness"`:
    the same tasks through lm-evaluation-harness and the differences (see
    `scratchlm.eval.lm_eval_adapter.compare_with_harness`)."""
    if tasks_dir is None and bpb_source is None:
        raise UserError("nothing to evaluate: give --tasks-dir (benchmark tasks) and/or --bpb SOURCE")
    if labels and tasks_dir is None:
        raise UserError("--tasks needs --tasks-dir (the suite the labels come from)")
    results: dict = {}
    if harness and tasks_dir is None:
        raise UserError("--harness needs --tasks-dir")
    if tasks_dir is not None:
        from scratchlm.eval.tasks import evaluate_suite_results, suite_score

        task_results = evaluate_suite_results(model, tokenizer, tasks_dir, labels, limit, num_fewshot, seed, progress)
        results["tasks"] = {label: r.to_dict() for label, r in task_results.items()}
        results["suite_score"] = suite_score(task_results)
        if harness:
            from scratchlm.eval.lm_eval_adapter import compare_with_harness

            results["harness"] = compare_with_harness(
                model, tokenizer, tasks_dir, labels, limit, num_fewshot, seed, progress=progress, ours=task_results
            )
    if bpb_source is not None:
        from scratchlm.eval.bpb import bits_per_byte

        bpb = bits_per_byte(
            model, tokenizer, bpb_source, stride=bpb_stride, max_documents=bpb_max_documents, progress=progress
        )
        results["bpb"] = bpb.bpb
        results["bpb_detail"] = {"source": str(bpb_source), **bpb.to_dict()}
    return results


def format_table(results: dict) -> str:
    """The results as an aligned text table."""
    lines = []
    tasks = results.get("tasks", {})
    if tasks:
        width = max(12, *(len(label) for label in tasks))
        lines.append(f"{'task':<{width}}  {'accuracy':>8}  {'acc_norm':>8}  {'centered':>8}  {'n':>6}  {'seconds':>8}")
        for label, r in tasks.items():
            norm = f"{r['accuracy_norm']:8.4f}" if "accuracy_norm" in r else f"{'-':>8}"
            lines.append(
                f"{label:<{width}}  {r['accuracy']:8.4f}  {norm}  {r['centered']:8.4f}  {r['n']:>6}  {r['seconds']:8.1f}"
            )
        lines.append(f"{'suite score':<{width}}  {'':>8}  {'':>8}  {results['suite_score']:8.4f}")
    if "bpb" in results:
        d = results["bpb_detail"]
        lines.append(
            f"bits per byte {results['bpb']:.4f}  (perplexity {d['perplexity']:.2f} per token; "
            f"{d['documents']} documents, {d['bytes']} bytes)"
        )
    return "\n".join(lines)
