"""Reading fine-tuning data: SFT conversations and DPO preference pairs from JSONL files.

SFT rows come in two layouts, detected per file from its first valid row:
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`
- Alpaca: `{"instruction": "...", "input": "..." (optional), "output": "..."}`
DPO rows are `{"prompt", "chosen", "rejected"}`, each either a string (the prompt becomes a user
message, the answers assistant messages) or a list of messages (the layout TRL uses); without a
`prompt`, chosen and rejected are whole conversations whose shared leading messages are the prompt.

A bad row is reported with its file and line and skipped, or raises a UserError with
`strict=True`. `builtin:python-stdlib` (and `builtin:python-stdlib:heldout`) gives the embedded
default data of `scratchlm.posttrain.defaults`. Not for tokenizing or batching (see sft.py / dpo.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.posttrain.chat_template import validate_messages

MAX_REPORTED = 20


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages before the answer (ends with a user turn, usually)
    chosen: list[dict]  # the preferred answer's messages
    rejected: list[dict]


@dataclass
class ReadReport:
    """What reading found: rows kept, rows skipped, and the first few problems by file:line."""

    rows: int = 0
    skipped: int = 0
    layouts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def skip(self, message: str, strict: bool) -> None:
        if strict:
            raise UserError(message)
        self.skipped += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(message)


def load_conversations(specs, strict: bool = False, report: ReadReport | None = None) -> list[list[dict]]:
    """Every conversation (list of messages) in the given files, in order."""
    report = report if report is not None else ReadReport()
    out: list[list[dict]] = []
    for spec in _as_list(specs):
        if spec.startswith("builtin:"):
            from scratchlm.posttrain.defaults import builtin_conversations

            out.extend(builtin_conversations(spec))
            continue
        layout = None
        for where, obj in _iter_rows(Path(spec), report, strict):
            if layout is None:
                layout = _detect_sft_layout(obj)
                if layout is None:
                    report.skip(f"{where}: neither a 'messages' row nor an Alpaca row "
                                "('instruction', 'output')", strict)
                    continue
                report.layouts[spec] = layout
            try:
                messages = _sft_row(obj, layout, where)
            except UserError as e:
                report.skip(str(e), strict)
                continue
            report.rows += 1
            out.append(messages)
    return out


def load_preference_pairs(specs, strict: bool = False, report: ReadReport | None = None) -> list[PreferencePair]:
    """Every preference pair in the given files, in order."""
    report = report if report is not None else ReadReport()
    out: list[PreferencePair] = []
    for spec in _as_list(specs):
        if spec.startswith("builtin:"):
            from scratchlm.posttrain.defaults import builtin_preference_pairs

            out.extend(builtin_preference_pairs(spec))
            continue
        for where, obj in _iter_rows(Path(spec), report, strict):
            try:
                pair = preference_pair_from_row(obj, where)
            except UserError as e:
                report.skip(str(e), strict)
                continue
            report.rows += 1
            out.append(pair)
    return out


def _as_list(specs) -> list[str]:
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    if not specs:
        raise UserError("no data given")
    return [str(s) for s in specs]


def _iter_rows(path: Path, report: ReadReport, strict: bool):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.skip(f"{where}: not valid UTF-8", strict)
                continue
            except json.JSONDecodeError as e:
                report.skip(f"{where}: not valid JSON ({e.msg})", strict)
                continue
            if not isinstance(obj, dict):
                report.skip(f"{where}: expected a JSON object", strict)
                continue
            yield where, obj


def _detect_sft_layout(obj: dict) -> str | None:
    if "messages" in obj:
        return "messages"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def _sft_row(obj: dict, layout: str, where: str) -> list[dict]:
    if layout == "messages":
        if "messages" not in obj:
            raise UserError(f"{where}: no field 'messages' (this file uses the messages layout)")
        messages = validate_messages(obj["messages"], f"{where}: messages")
    else:
        messages = alpaca_to_messages(obj, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message to learn from")
    return messages


def alpaca_to_messages(obj: dict, where: str) -> list[dict]:
    """Alpaca row -> [user, assistant]; a non-empty `input` follows the instruction."""
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise UserError(f"{where}: field {key!r} missing or not a string (Alpaca layout)")
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        raise UserError(f"{where}: field 'input' is not a string")
    user = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"]:
        messages.append({"role": "system", "content": obj["system"]})
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def preference_pair_from_row(obj: dict, where: str) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise UserError(f"{where}: no field {key!r}")
    if "prompt" not in obj:
        return _implicit_prompt_pair(obj, where)
    prompt = _as_messages(obj["prompt"], "user", f"{where}: prompt")
    chosen = _as_messages(obj["chosen"], "assistant", f"{where}: chosen")
    rejected = _as_messages(obj["rejected"], "assistant", f"{where}: rejected")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in answer):
            raise UserError(f"{where}: {key} has no assistant message")
    return PreferencePair(prompt, chosen, rejected)


def _as_messages(value, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return validate_messages(value, where)
    raise UserError(f"{where}: expected a string or a list of messages")


def _implicit_prompt_pair(obj: dict, where: str) -> PreferencePair:
    # TRL's "implicit prompt" layout: two whole conversations sharing their opening turns.
    chosen = _as_messages(obj["chosen"], "assistant", f"{where}: chosen")
    rejected = _as_messages(obj["rejected"], "assistant", f"{where}: rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise UserError(f"{where}: no 'prompt', and chosen/rejected do not share an opening prompt")
    return PreferencePair(chosen[:shared], chosen[shared:], rejected[shared:])
