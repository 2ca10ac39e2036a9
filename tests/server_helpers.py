"""Helpers for the server and web tests: a tiny run dir and a live uvicorn server on loopback.

Not a test file itself: tests/test_server*.py and tests/test_web*.py import it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch

TEXTS = [
    "Hello there! How are you today? I am fine, thank you. The weather is nice and sunny.\n" * 3,
    "User: what is two plus two?\nAssistant: four.\nUser: and three plus three?\nAssistant: six.\n",
    "Once upon a time there was a small model that learned to talk. It said hello to everyone.\n",
] * 3


def make_run(run_dir: Path, preset: str = "llama-tiny", chat_tokens: bool = False, seed: int = 0) -> Path:
    """A tiny random-weight run dir with a small trained BPE tokenizer."""
    from scratchlm.model.config import model_config
    from scratchlm.model.transformer import Transformer
    from scratchlm.runs import save_run
    from scratchlm.tokenizer.bpe import BPETokenizer

    tok = BPETokenizer.train(TEXTS, vocab_size=300, progress=False)
    if chat_tokens:
        from scratchlm.posttrain.chat_template import add_chat_tokens

        add_chat_tokens(tok)
    torch.manual_seed(seed)
    model = Transformer(model_config(preset, vocab_size=tok.vocab_size, max_seq_len=128))
    save_run(run_dir, model, tok, {"model": model.config.to_dict()})
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Run `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def slow_down(model, seconds: float):
    """Make every forward pass take at least `seconds` (so a stream lasts long enough to watch)."""
    return model.register_forward_hook(lambda module, args, output: time.sleep(seconds))
