"""Embedded default fine-tuning data, derived from the Python standard library with `ast`.

Every documented, reasonably short function of `builtin:python-stdlib` becomes one example:
- SFT: the instruction is the function's signature and docstring, the answer its body.
- DPO: the prompt is the same instruction, `chosen` the real body, `rejected` a corrupted one:
  another function's body (wrong body), the body with its syntax broken, or the body cut short
  (truncated). The kind and its details are chosen by a seed derived from the function's name, so
  the data are the same on every run.
A fixed ~5% of functions (by a hash of their qualified name) are held out for evaluation:
`builtin:python-stdlib` is the training split, `builtin:python-stdlib:heldout` the held-out one.

Not for downloading anything, nor for general-purpose code extraction.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from scratchlm.data.builtin import python_stdlib_files
from scratchlm.errors import UserError
from scratchlm.posttrain.data import PreferencePair

HELDOUT_PERCENT = 5
MAX_BODY_CHARS = 1200
MIN_BODY_LINES = 2
MAX_DOC_CHARS = 800
CORRUPTIONS = ("wrong_body", "broken_syntax", "truncated")


@dataclass(frozen=True)
class FunctionExample:
    qualname: str  # module.function (or module.Class.method)
    signature: str  # "def name(args) -> ret:"
    docstring: str
    body: str  # dedented source of the body after the docstring

    @property
    def instruction(self) -> str:
        doc = textwrap.indent(self.docstring, "    ").lstrip()
        return (
            f"Write the body of the Python function `{self.qualname}`.\n\n"
            f"{self.signature}\n    \"\"\"{doc}\"\"\""
        )

    @property
    def heldout(self) -> bool:
        digest = hashlib.sha256(self.qualname.encode()).digest()
        return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def extract_functions(path: Path, module: str) -> list[FunctionExample]:
    """The documented functions of one source file that make good examples."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node, prefix in _walk_functions(tree, module):
        example = _example_from(node, prefix, lines)
        if example is not None:
            out.append(example)
    return out


def _walk_functions(tree: ast.Module, module: str):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, module
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield item, f"{module}.{node.name}"


def _example_from(node, prefix: str, lines: list[str]) -> FunctionExample | None:
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or len(docstring) > MAX_DOC_CHARS or len(node.body) < 2:
        return None
    first, last = node.body[1].lineno, node.body[-1].end_lineno
    if last is None or last - first + 1 < MIN_BODY_LINES:
        return None
    body = textwrap.dedent("\n".join(lines[first - 1:last]))
    if len(body) > MAX_BODY_CHARS or '"""' in body:
        return None
    signature = _signature(node)
    return FunctionExample(f"{prefix}.{node.name}", signature, docstring, body)


def _signature(node) -> str:
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}:"


@lru_cache(maxsize=4)
def stdlib_functions(max_files: int | None = None) -> tuple[FunctionExample, ...]:
    """All examples of the standard library, in a fixed order (files sorted, then source order)."""
    files = python_stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in files[:max_files]:
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        out.extend(extract_functions(path, module))
    seen, unique = set(), []
    for ex in out:  # a name defined twice (platform branches) keeps its first definition
        if ex.qualname not in seen:
            seen.add(ex.qualname)
            unique.append(ex)
    return tuple(unique)


def split_examples(examples, heldout: bool) -> list[FunctionExample]:
    return [ex for ex in examples if ex.heldout == heldout]


def to_conversation(example: FunctionExample) -> list[dict]:
    return [{"role": "user", "content": example.instruction}, {"role": "assistant", "content": example.body}]


def corrupt(example: FunctionExample, pool: list[FunctionExample], kind: str | None = None) -> tuple[str, str]:
    """A worse body for `example`: (kind, text). Deterministic for a given example and pool."""
    rng = random.Random(example.qualname)
    kind = kind or CORRUPTIONS[rng.randrange(len(CORRUPTIONS))]
    body = example.body
    if kind == "wrong_body":
        others = [ex for ex in pool if ex.body != body]
        if others:
            return kind, others[rng.randrange(len(others))].body
        kind = "truncated"
    if kind == "broken_syntax":
        broken = _break_syntax(body, rng)
        if broken is not None:
            return kind, broken
        kind = "truncated"
    lines = body.splitlines()
    keep = max(1, len(lines) // 2) if len(lines) > 1 else 1
    truncated = "\n".join(lines[:keep]) if len(lines) > 1 else body[: max(1, len(body) // 2)]
    return "truncated", truncated


def _break_syntax(body: str, rng: random.Random) -> str | None:
    """Delete one bracket, colon or quote so the body no longer parses."""
    positions = [i for i, ch in enumerate(body) if ch in "():[]{}'\""]
    rng.shuffle(positions)
    for i in positions[:20]:
        candidate = body[:i] + body[i + 1:]
        if not _parses(candidate):
            return candidate
    return None


def _parses(body: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse("def f():\n" + textwrap.indent(body, "    "))
        return True
    except (SyntaxError, ValueError):
        return False


def default_pairs(examples: list[FunctionExample]) -> list[PreferencePair]:
    pairs = []
    for ex in examples:
        _, rejected = corrupt(ex, examples)
        pairs.append(PreferencePair(
            prompt=[{"role": "user", "content": ex.instruction}],
            chosen=[{"role": "assistant", "content": ex.body}],
            rejected=[{"role": "assistant", "content": rejected}],
        ))
    return pairs


def _parse_spec(spec: str) -> tuple[bool, int | None]:
    # builtin:python-stdlib[:heldout][:files=N]
    parts = spec.split(":")
    if len(parts) < 2 or parts[1] != "python-stdlib":
        raise UserError(f"unknown builtin fine-tuning data {spec!r} (known: builtin:python-stdlib, "
                        "builtin:python-stdlib:heldout)")
    heldout, max_files = False, None
    for part in parts[2:]:
        if part == "heldout":
            heldout = True
        elif part.startswith("files="):
            max_files = int(part.split("=", 1)[1])
        else:
            raise UserError(f"{spec!r}: unknown option {part!r} (heldout, files=N)")
    return heldout, max_files


def builtin_conversations(spec: str) -> list[list[dict]]:
    heldout, max_files = _parse_spec(spec)
    return [to_conversation(ex) for ex in split_examples(stdlib_functions(max_files), heldout)]


def builtin_preference_pairs(spec: str) -> list[PreferencePair]:
    heldout, max_files = _parse_spec(spec)
    return default_pairs(split_examples(stdlib_functions(max_files), heldout))
