"""`scratchlm generate` and `scratchlm chat`: thin CLI verbs over `scratchlm.infer.api`.

Not for logic: everything here is callable from Python (`scratchlm.load(RUN).generate(...)`).
"""

from __future__ import annotations

import argparse
import sys


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    p.add_argument("--model", required=True, metavar="RUN", help="run dir")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens if too long")
    p.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    p.set_defaults(func=run_generate)

    c = subparsers.add_parser("chat", help="chat with a model in the terminal (/reset, /system, /params)")
    c.add_argument("--model", required=True, metavar="RUN", help="run dir")
    c.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(c, temperature=0.7)
    c.set_defaults(func=run_chat)


def _load(args):
    import torch

    from scratchlm.infer.api import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=args.dtype)


def run_generate(args) -> int:
    lm = _load(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = dict(sampling_kwargs(args), max_new_tokens=args.max_new_tokens, stop=args.stop,
                   ignore_eos=args.ignore_eos, overflow="truncate" if args.truncate else "error")
    if args.no_stream:
        print(lm.generate(prompt, **options))
        return 0
    for piece in lm.stream(prompt, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(args) -> int:
    from scratchlm.infer.chat import ChatSession, run_repl

    lm = _load(args)
    kwargs = sampling_kwargs(args)
    session = ChatSession(lm, system=args.system, max_new_tokens=args.max_new_tokens, **kwargs)
    run_repl(session)
    return 0
