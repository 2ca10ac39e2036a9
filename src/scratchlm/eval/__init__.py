"""Evaluation: bits per byte, CORE-style benchmark tasks, and an lm-evaluation-harness adapter.

`scoring` (batched log-likelihoods, greedy decoding), `tasks` (suites, prompts, metrics,
`quick_eval` for training), `bpb`, `lm_eval_adapter`, `runner` + `cli` (`scratchlm eval`), `toy`
(models with known logits, for tests). See docs/eval.md. Submodules import torch lazily through
their own imports; this package file imports nothing so `scratchlm --help` stays fast.
"""
