"""Benchmark: examples scored per second on a CPU, batched vs one at a time, and vs the peer
(lm-evaluation-harness with a transformers model of the same weights).

A randomly initialised ~30M-parameter GPT-2-style model (8 layers, d_model 512, 8 heads, vocab
4096 from a BPE tokenizer trained here on the shared corpora) is saved as a run and exported with
`scratchlm.interop.hf`. The task is a multiple-choice benchmark from the shared suite (default
arc_easy, 3-shot as tasks.json says, the first N examples). Measured:

- scratchlm, batched (`--batch-size`, default 32 sequences per forward pass);
- scratchlm, one request at a time (batch size 1);
- scratchlm batched with full logits (the model wrapped as a plain callable, so the output head
  runs at every position instead of only the scored ones): what that optimisation buys;
- the peer: lm_eval's `hf` model (HFLM) on the same task, exported as an lm_eval task by
  `scratchlm.eval.lm_eval_adapter.write_harness_tasks`, same batch size, same threads. (HFLM
  puts no EOT before contexts, so its accuracies may differ slightly: the speed is compared.)

The configurations run in turn, `--repeats` rounds, best of each kept, wall and CPU seconds both
(CPU seconds are steadier on a shared machine). Our three accuracies must be identical.
`--head-check` instead times only the output-head shortcut on a 32k-vocabulary model of the same
shape (32 random requests of 300 context + 5 continuation tokens), scores checked identical.

    python benchmarks/eval.py [--tasks-dir ../shared/eval] [--task arc_easy] [--limit 40]
                              [--batch-size 32] [--threads 2] [--repeats 2] [--no-peer]
    python benchmarks/eval.py --head-check

Not a test: it prints examples/s and ratios; docs/benchmarks.md records results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLM_SHARED", REPO.parent / "shared"))


def build_run(run_dir: Path, corpora: Path, vocab_size: int) -> None:
    from scratchlm.model.config import model_config
    from scratchlm.model.transformer import Transformer
    from scratchlm.runs import save_run
    from scratchlm.tokenizer import BPETokenizer

    texts = []
    for path in sorted(corpora.glob("*.jsonl")):
        for line in open(path, encoding="utf-8"):
            texts.append(json.loads(line)["text"][:300_000])
    tokenizer = BPETokenizer.train(texts, vocab_size=vocab_size, progress=False)
    torch.manual_seed(0)
    config = model_config("gpt2", vocab_size=tokenizer.vocab_size, n_layer=8, n_head=8, d_model=512, max_seq_len=1024)
    save_run(run_dir, Transformer(config).eval(), tokenizer, {})


def interleaved(configs: list[tuple[str, object]], repeats: int) -> dict[str, tuple[float, float, object]]:
    """Best wall and CPU seconds of each config, the configs run in turn each round so that a
    change in the machine's load hits all of them alike."""
    best: dict[str, tuple[float, float, object]] = {}
    for _ in range(repeats):
        for name, fn in configs:
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            old = best.get(name, (float("inf"), float("inf"), None))
            best[name] = (min(old[0], wall), min(old[1], cpu), result)
    return best


def ours(run, spec, limit: int, batch_size: int, full_logits: bool = False):
    from scratchlm.eval.scoring import ScoringModel, as_scoring_model
    from scratchlm.eval.tasks import evaluate_task

    if full_logits:  # a plain callable: no head-at-scored-positions shortcut
        model = run.model
        scorer = ScoringModel(lambda ids: model(ids), model.config.max_seq_len, batch_size=batch_size)
    else:
        scorer = as_scoring_model(run.model, batch_size=batch_size)
    return evaluate_task(scorer, run.tokenizer, spec, limit=limit, progress=False)


def peer(hf_dir: Path, task_dir: Path, name: str, batch_size: int):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), batch_size=batch_size, device="cpu", dtype="float32")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    def run():
        return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, bootstrap_iters=0,
                                       log_samples=False, verbosity="ERROR")

    return run


def head_check(repeats: int) -> None:
    """Scored-positions head vs full logits, on random requests to a 32k-vocabulary model."""
    from scratchlm.eval.scoring import Request, ScoringModel, as_scoring_model, score_requests
    from scratchlm.model.config import model_config
    from scratchlm.model.transformer import Transformer

    torch.manual_seed(0)
    vocab = 32768
    model = Transformer(model_config("gpt2", vocab_size=vocab, n_layer=8, n_head=8, d_model=512, max_seq_len=1024)).eval()
    g = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(0, vocab, (300,), generator=g).tolist(),
                        torch.randint(0, vocab, (5,), generator=g).tolist()) for _ in range(32)]
    fast = as_scoring_model(model)
    full = ScoringModel(lambda ids: model(ids), 1024)  # a plain callable: logits at every position
    best = interleaved([("fast", lambda: score_requests(fast, requests)),
                        ("full", lambda: score_requests(full, requests))], repeats)
    (fw, fc, a), (lw, lc, b) = best["fast"], best["full"]
    assert all(abs(x.logprob - y.logprob) < 1e-3 for x, y in zip(a, b))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {vocab}, 32 requests")
    print(f"head at scored positions {fw:.2f} s ({fc:.2f} CPU s), full logits {lw:.2f} s ({lc:.2f} CPU s): "
          f"{lw / fw:.2f}x wall, {lc / fc:.2f}x CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks-dir", type=Path, default=SHARED / "eval")
    parser.add_argument("--corpora", type=Path, default=SHARED / "corpora")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--no-peer", action="store_true", help="skip the lm-evaluation-harness + transformers peer")
    parser.add_argument("--head-check", action="store_true", help="only time the output-head shortcut")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.head_check:
        head_check(args.repeats)
        return

    from scratchlm.eval.tasks import load_suite
    from scratchlm.runs import load_run

    spec = load_suite(args.tasks_dir)[args.task]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_run(tmp / "run", args.corpora, args.vocab_size)
        run = load_run(tmp / "run")
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"model: {n_params / 1e6:.1f}M parameters, vocab {run.tokenizer.vocab_size}, "
              f"task {args.task} ({spec.type}, {spec.num_fewshot}-shot), {args.limit} examples, "
              f"{args.threads} threads, {platform.processor() or platform.machine()}")
        ours(run, spec, 2, args.batch_size)  # warm-up
        configs = [
            (f"scratchlm batched (batch {args.batch_size})", lambda: ours(run, spec, args.limit, args.batch_size)),
            ("scratchlm one at a time", lambda: ours(run, spec, args.limit, 1)),
            ("scratchlm batched, full logits", lambda: ours(run, spec, args.limit, args.batch_size, full_logits=True)),
        ]
        peer_name = f"lm_eval hf (batch {args.batch_size})"
        if not args.no_peer:
            from scratchlm.eval.lm_eval_adapter import TASK_PREFIX, harness_value, write_harness_tasks
            from scratchlm.interop.hf import export_hf

            export_hf(tmp / "run", tmp / "hf")
            names = write_harness_tasks(args.tasks_dir, tmp / "tasks", [args.task], args.limit)
            configs.append((peer_name, peer(tmp / "hf", tmp / "tasks", names[0], args.batch_size)))
        best = interleaved(configs, args.repeats)
        accuracy = {}
        for name, (_, _, result) in best.items():
            accuracy[name] = (harness_value(result["results"][TASK_PREFIX + args.task], "acc")
                              if name == peer_name else result.accuracy)
        ours_accuracies = {a for n, a in accuracy.items() if n != peer_name}
        assert len(ours_accuracies) == 1, f"batched, one-at-a-time and full-logits scoring disagree: {accuracy}"
        print(f"{'':34} {'wall s':>8} {'CPU s':>8} {'examples/s':>11} {'ex/CPU-s':>9} {'accuracy':>9}")
        for name, (wall, cpu, _) in best.items():
            print(f"{name:34} {wall:8.2f} {cpu:8.2f} {args.limit / wall:11.3f} {args.limit / cpu:9.3f} {accuracy[name]:9.3f}")
        (bw, bc, _), (sw, sc, _), (fw, fc, _) = (best[n] for n, _ in configs[:3])
        print(f"batched / one at a time: {sw / bw:.2f}x wall, {sc / bc:.2f}x CPU")
        print(f"head at scored positions / full logits: {fw / bw:.2f}x wall, {fc / bc:.2f}x CPU")
        if not args.no_peer:
            pw, pc, _ = best[peer_name]
            print(f"scratchlm batched / lm_eval hf: {pw / bw:.2f}x wall, {pc / bc:.2f}x CPU")

if __name__ == "__main__":
    main()
