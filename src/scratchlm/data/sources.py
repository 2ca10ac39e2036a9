"""Text sources shared by every stage: turn source specs into a stream of documents.

A spec is a `.txt` (or other plain text) file, which is one document; a `.jsonl` file, one
document per line taken from a field (`text` by default); a `.parquet` file, one document per
row of its `text` column (read in record batches with pyarrow); a directory or glob of those;
`builtin:NAME` (see `scratchlm.data.builtin`); or `hf:NAME[:CONFIG][:SPLIT]`, a Hugging Face
dataset streamed with the optional `datasets` package (NAME may be a local directory of data
files). Invalid UTF-8 is replaced and counted, never a crash; a malformed JSONL line or a null
Parquet value is skipped and reported with its file and line/row, or raises with `strict=True`;
a Parquet file without the text column is an error naming its columns. Not for cleaning,
deduplication or tokenization (see the other data modules).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from scratchlm.data.builtin import builtin_files
from scratchlm.errors import UserError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
MAX_REPORTED_PROBLEMS = 20
HF_PREFIX = "hf:"


@dataclass
class Document:
    text: str
    source: str  # the spec this document came from
    id: str  # file path, or file:line for JSONL


@dataclass
class SourceStats:
    """What reading the sources found: counts for the summary, and the first few problems."""

    documents: int = 0
    bytes: int = 0
    files: int = 0
    invalid_utf8_documents: int = 0
    malformed_lines: int = 0
    empty_documents: int = 0
    problems: list[str] = field(default_factory=list)

    def report(self, message: str) -> None:
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(message)


def as_spec_list(specs: str | Iterable[str]) -> list[str]:
    return [specs] if isinstance(specs, str) else list(specs)


def resolve_files(spec: str) -> list[Path]:
    """The files a spec names, in a deterministic order; a clear error when there are none."""
    if spec.startswith(HF_PREFIX):
        raise UserError(f"{spec!r} is a Hugging Face dataset, not a set of files")
    if spec.startswith("builtin:"):
        return builtin_files(spec.split(":", 1)[1])
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        files = [p for p in matches if _is_readable_kind(p)]
        if not files:
            raise UserError(f"no readable .txt/.jsonl/.parquet files match {spec!r}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_readable_kind(p))
        if not files:
            raise UserError(f"directory has no readable .txt/.jsonl/.parquet files: {spec}")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"input not found: {spec}")


def _is_readable_kind(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES | TEXT_SUFFIXES | EXTRA_SUFFIXES


# Other modules (e.g. Parquet support) register further file kinds here.
EXTRA_SUFFIXES: set[str] = set()
EXTRA_READERS: dict[str, object] = {}


def decode_utf8(data: bytes, stats: SourceStats) -> str:
    """Decode bytes as UTF-8, replacing invalid sequences with U+FFFD and counting the document."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_documents += 1
        return data.decode("utf-8", errors="replace")


def iter_documents(
    specs: str | Iterable[str],
    text_field: str = "text",
    strict: bool = False,
    stats: SourceStats | None = None,
) -> Iterator[Document]:
    """Every document of every spec, in order. Pass `stats` to collect counts and problems."""
    stats = stats if stats is not None else SourceStats()
    spec_list = as_spec_list(specs)
    if not spec_list:
        raise UserError("no input given")
    for spec in spec_list:
        if spec.startswith(HF_PREFIX):
            yield from _counted(iter_hf_dataset(spec, text_field, strict, stats), stats)
            continue
        for path in resolve_files(spec):
            stats.files += 1
            for doc in _iter_file(path, spec, text_field, strict, stats):
                if not doc.text:
                    stats.empty_documents += 1
                stats.documents += 1
                stats.bytes += len(doc.text.encode("utf-8", errors="surrogatepass"))
                yield doc


def _counted(docs: Iterator[Document], stats: SourceStats) -> Iterator[Document]:
    stats.files += 1
    for doc in docs:
        if not doc.text:
            stats.empty_documents += 1
        stats.documents += 1
        stats.bytes += len(doc.text.encode("utf-8", errors="surrogatepass"))
        yield doc


def input_size(specs: str | Iterable[str]) -> int | None:
    """Total bytes of the files the specs name (for progress bars); None when unknown."""
    total = 0
    for spec in as_spec_list(specs):
        if spec.startswith(HF_PREFIX):
            return None
        try:
            total += sum(p.stat().st_size for p in resolve_files(spec))
        except (UserError, OSError):
            return None
    return total


def iter_texts(specs: str | Iterable[str], **kwargs) -> Iterator[str]:
    for doc in iter_documents(specs, **kwargs):
        yield doc.text


def _iter_file(path: Path, spec: str, text_field: str, strict: bool, stats: SourceStats):
    suffix = path.suffix.lower()
    if suffix in EXTRA_READERS:
        yield from EXTRA_READERS[suffix](path, spec, text_field, strict, stats)
    elif suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, spec, text_field, strict, stats)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        yield Document(decode_utf8(data, stats), spec, str(path))


def _iter_jsonl(path: Path, spec: str, text_field: str, strict: bool, stats: SourceStats):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line = decode_utf8(raw, stats)
            text = _jsonl_text(line, text_field, path, lineno, strict, stats)
            if text is not None:
                yield Document(text, spec, f"{path}:{lineno}")


def _jsonl_text(line, text_field, path, lineno, strict, stats) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return _malformed(f"{path}:{lineno}: not valid JSON ({e.msg})", strict, stats)
    if not isinstance(obj, dict) or text_field not in obj:
        return _malformed(f"{path}:{lineno}: no field {text_field!r}", strict, stats)
    text = obj[text_field]
    if not isinstance(text, str):
        return _malformed(f"{path}:{lineno}: field {text_field!r} is not a string", strict, stats)
    return text


def _malformed(message: str, strict: bool, stats: SourceStats) -> None:
    if strict:
        raise UserError(message)
    stats.malformed_lines += 1
    stats.report(message)
    return None


# -- Parquet ----------------------------------------------------------------------------------
PARQUET_BATCH_ROWS = 1024


def _iter_parquet(path: Path, spec: str, text_field: str, strict: bool, stats: SourceStats):
    """One document per row of the text column, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a core dependency
        raise UserError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path}: Parquet file has no {text_field!r} column "
                        f"(columns: {', '.join(columns) or 'none'})")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                value = decode_utf8(value, stats)
            if not isinstance(value, str):
                _malformed(f"{path}: row {row}: {text_field!r} is "
                           f"{'null' if value is None else type(value).__name__}", strict, stats)
                continue
            yield Document(value, spec, f"{path}:{row}")


EXTRA_SUFFIXES.add(".parquet")
EXTRA_READERS[".parquet"] = _iter_parquet


# -- Hugging Face datasets --------------------------------------------------------------------


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` -> (name, config or None, split, default "train")."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad Hugging Face source {spec!r}; expected hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def iter_hf_dataset(spec: str, text_field: str, strict: bool, stats: SourceStats):
    """Stream a Hugging Face dataset row by row (`datasets` is an optional dependency)."""
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec}: reading Hugging Face datasets needs the optional package "
                        "`datasets` (pip install datasets)") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, missing dataset, bad config: all a user's to fix
        raise UserError(f"{spec}: cannot open dataset ({type(e).__name__}: {e})") from None
    for row_number, row in enumerate(stream, start=1):
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            _malformed(f"{spec}: row {row_number}: no string field {text_field!r}", strict, stats)
            continue
        yield Document(value, spec, f"{spec}:{row_number}")
