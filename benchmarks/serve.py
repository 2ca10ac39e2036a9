"""Serving benchmark: 32 concurrent streaming clients against `scratchlm serve` on loopback.

Runs the server twice as a subprocess on the same run dir, once with continuous batching
(`--max-batch 32`: all active requests decoded together, requests joining and leaving at every
step) and once serving requests one at a time (`--max-batch 1`), and sends the same load each
time: N clients, each streaming chat completions of a fixed length (`ignore_eos`) back to back.
Prints, for both, the total generated tokens per second, the mean time to first token, the
number of errors, and the throughput ratio (target >= 3x with 32 clients, no errors).

The model is a random-weight run made once under .bench/deploy/serve-run (shape of the llama
preset at d_model 256, 4 layers; the speed does not depend on the weights), or `--model RUN`.
Not a test: the machine is shared, so timings are noisy; run it twice.
Usage: python benchmarks/serve.py [--clients 32] [--tokens 48] [--requests-per-client 1] [--model RUN]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench" / "deploy"
sys.path.insert(0, str(REPO / "src"))


def make_random_run(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    import torch

    from scratchlm.data.sources import iter_texts
    from scratchlm.model.config import model_config
    from scratchlm.model.transformer import Transformer
    from scratchlm.runs import save_run
    from scratchlm.tokenizer.bpe import BPETokenizer

    texts = [t for _, t in zip(range(200), iter_texts(["builtin:python-stdlib"]))]
    tok = BPETokenizer.train(texts, vocab_size=2048, progress=False)
    torch.manual_seed(0)
    model = Transformer(model_config("llama", n_layer=4, d_model=256, n_head=4, n_kv_head=2,
                                     vocab_size=tok.vocab_size, max_seq_len=512))
    save_run(path, model, tok, {"model": model.config.to_dict()})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("SCRATCHLM_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "serve", "--model", str(run), "--port", str(port),
         "--max-batch", str(max_batch), "--max-queue", "1024"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def one_client(client, url: str, model: str, tokens: int, requests: int, index: int, stats: dict) -> None:
    for r in range(requests):
        body = {"model": model, "messages": [{"role": "user", "content": f"Client {index} request {r}: tell me a story."}],
                "max_tokens": tokens, "temperature": 0.8, "seed": index * 1000 + r, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = None
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
                if resp.status_code != 200:
                    stats["errors"] += 1
                    continue
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats["errors"] += 1
                        break
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        stats["tokens"] += chunk["usage"]["completion_tokens"]
        except Exception:  # noqa: BLE001 - a benchmark counts failures, whatever they are
            stats["errors"] += 1
            continue
        if first is not None:
            stats["ttft"].append(first)


async def load(url: str, model: str, clients: int, tokens: int, requests: int) -> dict:
    import httpx

    stats = {"tokens": 0, "errors": 0, "ttft": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client, url, model, tokens, requests, i, stats) for i in range(clients)))
        stats["seconds"] = time.perf_counter() - start
    return stats


def run_mode(run: Path, max_batch: int, args) -> dict:
    proc, url = start_server(run, max_batch)
    try:
        import httpx

        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(load(url, model, 2, 4, 1))  # warm-up
        stats = asyncio.run(load(url, model, args.clients, args.tokens, args.requests_per_client))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    stats["tok_s"] = stats["tokens"] / stats["seconds"]
    stats["mean_ttft"] = sum(stats["ttft"]) / max(1, len(stats["ttft"]))
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--requests-per-client", type=int, default=1)
    args = parser.parse_args()
    run = args.model or make_random_run(BENCH / "serve-run")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared: noisy); "
          f"run {run}; {args.clients} clients x {args.requests_per_client} x {args.tokens} tokens, streaming")
    results = {}
    for name, max_batch in (("continuous batching (--max-batch 32)", 32), ("one at a time (--max-batch 1)", 1)):
        s = run_mode(run, max_batch, args)
        results[max_batch] = s
        print(f"{name:40s} {s['tokens']:6d} tokens in {s['seconds']:7.1f} s = {s['tok_s']:7.1f} tok/s, "
              f"mean TTFT {s['mean_ttft']:6.2f} s, errors {s['errors']}")
    ratio = results[32]["tok_s"] / results[1]["tok_s"]
    errors = results[32]["errors"] + results[1]["errors"]
    verdict = "meets" if ratio >= 3 and errors == 0 else "MISSES"
    print(f"throughput ratio (batched / one at a time): {ratio:.2f}x  -> {verdict} the >= 3x target, {errors} errors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
