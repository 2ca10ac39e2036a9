"""What a person reads about a dataset: the summary table, the stats JSON and decoded samples.

Pure functions of a dataset's `index.json` (and its tokens, for samples), so the CLI only
prints their results. Not for computing the statistics (the pipeline records them).
"""

from __future__ import annotations

import numpy as np

from scratchlm.data.shards import Dataset
from scratchlm.errors import UserError


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}")
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _weight(weight) -> str:
    return "-" if weight is None else f"{weight:.2f}"


def summary_table(index: dict) -> str:
    """Documents and bytes read, removed by each stage, kept; tokens per split; problems."""
    stats = index.get("stats", {})
    read = stats.get("read", {})
    rows = [("stage", "docs", "bytes"),
            ("read", str(read.get("docs", 0)), _size(read.get("bytes", 0)))]
    for name, removed in stats.get("removed", {}).items():
        rows.append((f"  removed: {name}", f"-{removed['docs']}", f"-{_size(removed['bytes'])}"))
    kept = stats.get("kept", {})
    rows.append(("kept", str(kept.get("docs", 0)), _size(kept.get("bytes", 0))))
    for split, info in index.get("splits", {}).items():
        rows.append((f"  {split}", f"{info['docs']} docs", f"{info['tokens']:,} tokens"))
    lines = [_table(rows)]
    sources = index.get("sources", [])
    if len(sources) > 1:
        lines.append("")
        lines.append(_table([("source (weight)", "docs kept", "tokens")] + [
            (f"{s['spec']} ({_weight(s['weight'])})", str(s["docs_kept"]), f"{s['tokens']:,}")
            for s in sources]))
    notes = []
    if any(src.get("weight") is not None for src in sources):
        unread = [src["spec"] for src in sources if not src["exhausted"] and src["weight"]]
        if unread:
            notes.append("mixture stopped when a source ran out (to keep the weights); not read "
                         f"to the end: {', '.join(unread)}")
    for key, label in (("malformed_lines", "malformed lines skipped"),
                       ("invalid_utf8_docs", "documents with invalid UTF-8 (replaced)"),
                       ("empty_docs", "empty documents")):
        if read.get(key):
            notes.append(f"{label}: {read[key]}")
    contamination = stats.get("decontamination")
    if contamination:
        notes.append(f"contaminated documents ({contamination['mode']}): "
                     f"{contamination['docs_flagged']}")
    if index.get("splits", {}).get("val", {}).get("docs", 1) == 0 and \
            index.get("settings", {}).get("val_fraction", 0) > 0:
        notes.append("warning: no document fell in the validation split")
    notes += [f"problem: {p}" for p in read.get("problems", [])[:5]]
    return "\n".join(lines + notes)


def dataset_stats(dataset: Dataset) -> dict:
    """The JSON `data stats` prints: totals, per split, per source, per filter."""
    index = dataset.index
    return {
        "path": str(dataset.path),
        "tokens": sum(dataset.num_tokens(s) for s in ("train", "val")),
        "docs": sum(dataset.num_docs(s) for s in ("train", "val")),
        "splits": {s: {"tokens": dataset.num_tokens(s), "docs": dataset.num_docs(s),
                       "shards": len(dataset.shard_records(s))} for s in ("train", "val")},
        "dtype": index["dtype"], "vocab_size": index["vocab_size"], "eot_id": index["eot_id"],
        "tokenizer_sha256": index["tokenizer_sha256"],
        "sources": index.get("sources", []),
        "stats": index.get("stats", {}),
    }


def sample_windows(dataset: Dataset, tokenizer, count: int = 3, seq_len: int = 64,
                   split: str = "train", seed: int = 0) -> list[str]:
    """Decoded random windows, exactly as the loader would cut them (EOT shown as its text)."""
    if tokenizer.fingerprint != dataset.tokenizer_sha256:
        raise UserError(f"tokenizer {tokenizer.fingerprint[:12]}... did not make dataset "
                        f"{dataset.path} ({dataset.tokenizer_sha256[:12]}...)")
    stream_length = dataset.num_tokens(split)
    if stream_length == 0:
        raise UserError(f"dataset {dataset.path} has no {split!r} tokens")
    from scratchlm.data.loader import TokenLoader

    seq_len = min(seq_len, stream_length - 1)
    loader = TokenLoader(dataset, split=split, seq_len=seq_len, batch_size=count, seed=seed)
    inputs, targets = loader.next_batch()
    windows = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1)
    return [tokenizer.decode(row.tolist()) for row in windows]
