"""`scratchlm eval`: benchmark tasks, bits per byte, and agreement with lm-evaluation-harness.

Thin: loading is `scratchlm.runs.load_run`, the work is `scratchlm.eval.runner.evaluate` (and
`scratchlm.eval.lm_eval_adapter.compare_with_harness` behind --harness).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: benchmark tasks (CORE-style), bits per byte",
        description="Evaluate a run: CORE-style benchmark tasks from a task-suite directory "
        "(tasks.json + JSONL files) and/or bits per byte on held-out text.",
    )
    p.add_argument("--model", metavar="RUN", help="a run directory (required unless --write-harness-tasks)")
    p.add_argument("--tasks-dir", metavar="DIR", help="a task suite: a directory with tasks.json (or *.jsonl files)")
    p.add_argument("--tasks", nargs="+", metavar="LABEL", help="only these tasks of the suite")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N examples of each task")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per item (default: each task's)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws (default 1234)")
    p.add_argument("--bpb", metavar="SOURCE", help="bits per byte on a dataset dir's val split or a text source")
    p.add_argument("--bpb-stride", type=int, metavar="S", help="sliding-window stride (default: half the window)")
    p.add_argument("--bpb-max-docs", type=int, metavar="N", help="score only the first N documents")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="sequences per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", metavar="FILE", help="write the results JSON here")
    p.add_argument("--harness", action="store_true",
                   help="also score the tasks through lm-evaluation-harness (via the adapter) and report the differences")
    p.add_argument("--write-harness-tasks", metavar="DIR",
                   help="write the selected tasks as lm-evaluation-harness tasks (scratchlm_<label>) into DIR "
                   "and exit; run them with python -m scratchlm.eval.lm_eval_adapter --include_path DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)


@contextlib.contextmanager
def _one_line_warnings():
    """Show our warnings (e.g. truncated contexts) as one plain line each on stderr."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"scratchlm: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def run_eval(args: argparse.Namespace) -> int:
    from scratchlm.errors import UserError
    from scratchlm.eval.runner import evaluate, format_table
    from scratchlm.eval.scoring import as_scoring_model
    from scratchlm.files import atomic_write_json
    from scratchlm.runs import load_run

    for name in ("limit", "num_fewshot", "bpb_stride", "bpb_max_docs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "num_fewshot" else 0):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.write_harness_tasks:
        return write_harness(args)
    if not args.model:
        raise UserError("--model RUN is required")
    run = load_run(args.model, device=args.device)
    if run.tokenizer is None:
        raise UserError(f"run {args.model} has no tokenizer/ directory")
    scorer = as_scoring_model(run.model, batch_size=args.batch_size)
    with _one_line_warnings():
        results = evaluate(
            scorer, run.tokenizer, args.tasks_dir, args.tasks, args.limit, args.num_fewshot,
            bpb_source=args.bpb, bpb_stride=args.bpb_stride, bpb_max_documents=args.bpb_max_docs,
            seed=args.seed, progress=not args.quiet, harness=args.harness,
        )
        results["model"] = str(args.model)
    print(format_table(results))
    if args.harness:
        print(f"lm-evaluation-harness agreement: largest difference {results['harness']['max_diff']:.3g} "
              "(accuracy, and examples scored differently)")
    if args.out:
        atomic_write_json(args.out, results)
        print(f"results written to {args.out}", file=sys.stderr)
    return 0


def write_harness(args: argparse.Namespace) -> int:
    from scratchlm.errors import UserError
    from scratchlm.eval.lm_eval_adapter import write_harness_tasks

    if not args.tasks_dir:
        raise UserError("--write-harness-tasks needs --tasks-dir")
    names = write_harness_tasks(args.tasks_dir, args.write_harness_tasks, args.tasks, args.limit, args.num_fewshot, args.seed)
    print(f"wrote {len(names)} lm-evaluation-harness task(s) to {args.write_harness_tasks}: {','.join(names)}")
    return 0
