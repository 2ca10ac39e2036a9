"""The `scratchlm chat` REPL: a conversation with a model in the terminal.

Keeps the history, streams each answer, and shows tokens/s after it. Commands: `/reset` (forget
the conversation), `/system TEXT` (set the system prompt), `/params [key=value ...]` (show or set
sampling parameters), `/quit`. A model without a chat template (pretrained only) still works: the
conversation is written as plain "User:/Assistant:" text and the answer stops at the next "User:".
Not for generation itself (see `scratchlm.infer.api`).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from scratchlm.errors import UserError
from scratchlm.infer.sampling import SamplingParams

HELP = "commands: /reset, /system TEXT, /params [key=value ...], /quit"
PLAIN_STOP = ["\nUser:"]


class ChatSession:
    """History plus parameters; `reply(text)` yields the answer in pieces and records it."""

    def __init__(self, lm, system: str | None = None, max_new_tokens: int = 256, **sampling) -> None:
        self.lm = lm
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.params = {"temperature": 0.7, "top_p": 0.95, **sampling}
        SamplingParams(**self.params)  # validate now, not mid-conversation
        self.history: list[dict] = []
        self.last_tokens = 0
        self.last_seconds = 0.0

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history = []

    def set_params(self, assignments: list[str]) -> None:
        new = dict(self.params)
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"/params: expected key=value, got {item!r}")
            if key == "max_new_tokens":
                self.max_new_tokens = int(value)
                continue
            new[key] = None if value.lower() == "none" else float(value) if "." in value else int(value)
        SamplingParams.from_dict(new)
        self.params = new

    def reply(self, text: str):
        self.history.append({"role": "user", "content": text})
        options = dict(self.params, max_new_tokens=self.max_new_tokens)
        if self.lm.has_chat_template:
            pieces = self.lm.chat(self.messages(), stream=True, **options)
        else:
            prompt = self._plain_prompt()
            pieces = self.lm.stream(self.lm.tokenizer.encode(prompt), stop=PLAIN_STOP, overflow="truncate", **options)
        answer, start = [], time.perf_counter()
        for piece in pieces:
            answer.append(piece)
            yield piece
        self.last_seconds = time.perf_counter() - start
        text = "".join(answer)
        self.last_tokens = len(self.lm.tokenizer.encode(text))
        self.history.append({"role": "assistant", "content": text.strip() if not self.lm.has_chat_template else text})

    def _plain_prompt(self) -> str:
        lines = [self.system] if self.system else []
        for m in self.history:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
        return "\n".join(lines) + "\nAssistant:"


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read-eval-print until /quit or end of input."""
    mode = "chat template" if session.lm.has_chat_template else "no chat template: plain User/Assistant text"
    print(f"scratchlm chat ({mode}). {HELP}", file=out)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=out)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if handle_command(session, line, out):
                return
            continue
        for piece in session.reply(line):
            print(piece, end="", flush=True, file=out)
        rate = session.last_tokens / session.last_seconds if session.last_seconds > 0 else 0.0
        print(f"\n[{session.last_tokens} tokens, {rate:.1f} tokens/s]", file=out)


def handle_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run one /command; True means quit."""
    command, _, rest = line.partition(" ")
    try:
        if command in ("/quit", "/exit"):
            return True
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", file=out)
        elif command == "/system":
            session.system = rest.strip() or None
            print(f"(system prompt {'set' if session.system else 'cleared'})", file=out)
        elif command == "/params":
            if rest.strip():
                session.set_params(rest.split())
            print(" ".join(f"{k}={v}" for k, v in {**session.params, "max_new_tokens": session.max_new_tokens}.items()),
                  file=out)
        else:
            print(HELP, file=out)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=out)
    return False
