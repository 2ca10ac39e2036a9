"""`scratchlm quantize` and `scratchlm serve`: thin CLI verbs over the deployment modules.

    scratchlm quantize --model RUN --bits 8|4 [--group-size G] [--method rtn|gptq|awq]
                       [--calibration DATASET_DIR] [--embed-bits ...] [--head-bits ...]
                       [--tune-steps N] --out RUN2
    scratchlm serve --model RUN [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Not for logic: see `scratchlm.model.quant` and `scratchlm.infer.server`.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    q = subparsers.add_parser(
        "quantize", help="quantize a run's weights to INT8 / INT4 (round-to-nearest, GPTQ or AWQ)",
        description="Write a quantized copy of a run dir: INT8 per output channel or INT4 per group, "
        "round-to-nearest, or GPTQ / AWQ calibrated on a dataset dir. Load it like any run.")
    q.add_argument("--model", required=True, metavar="RUN", help="run dir to quantize")
    q.add_argument("--out", required=True, metavar="RUN2", help="new run dir to write")
    q.add_argument("--bits", type=int, choices=[8, 4], default=8)
    q.add_argument("--group-size", type=int, default=64, metavar="G", help="INT4 group size (32, 64, 128; default 64)")
    q.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn")
    q.add_argument("--calibration", metavar="DATASET_DIR", help="dataset dir of calibration text (GPTQ, AWQ, --tune-steps)")
    q.add_argument("--calibration-windows", type=int, default=128, metavar="N")
    q.add_argument("--calibration-seq-len", type=int, default=256, metavar="T")
    q.add_argument("--embed-bits", choices=["same", "8", "4", "none"], default="same",
                   help="token embedding format (default: same as --bits; a tied head follows it)")
    q.add_argument("--head-bits", choices=["same", "8", "4", "none"], default="same",
                   help="output head format when it is not tied (default: same as --bits)")
    q.add_argument("--tune-steps", type=int, default=0, metavar="N",
                   help="then tune the scales/offsets for N steps to match the float model on the "
                   "calibration windows (needs --calibration; default 0 = off)")
    q.add_argument("--tune-lr", type=float, default=1e-2, help="learning rate of --tune-steps (default 0.01)")
    q.set_defaults(func=run_quantize)

    s = subparsers.add_parser(
        "serve", help="serve a run over an OpenAI-compatible HTTP API, with a web chat page",
        description="OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions (streaming), "
        "/health, and a chat page at /. Binds to 127.0.0.1 unless --host says otherwise.")
    s.add_argument("--model", required=True, metavar="RUN")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 "
                   "(default: $SCRATCHLM_API_KEY, else none)")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    s.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429 (default 256)")
    s.set_defaults(func=run_serve)


def run_quantize(args: argparse.Namespace) -> int:
    from scratchlm.model.quant import quantize_run

    report = quantize_run(
        args.model, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
        calibration_dir=args.calibration, calibration_windows=args.calibration_windows,
        calibration_seq_len=args.calibration_seq_len, embed_bits=args.embed_bits, head_bits=args.head_bits,
        tune_steps=args.tune_steps, tune_lr=args.tune_lr,
    )
    print(report.summary(), file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from scratchlm.infer.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
          max_batch=args.max_batch, max_queue=args.max_queue)
    return 0
