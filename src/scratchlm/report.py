"""Report cards: one structured document rendered both as Markdown and as a standalone HTML page.

A `Report` is a title and a list of `Section`s; a section holds blocks (paragraphs, tables,
images, code or text samples, key/value lists, coloured token samples). The same blocks give
`report.md` and `report.html`, so the two never disagree. `line_plot` draws PNG curves with
matplotlib's Agg backend (no display needed). `token_sample` turns a tokenizer's split of a text
into a block that HTML shows as coloured spans and Markdown as `|tok|tok|`.

Used by `scratchlm speedrun` and meant to be reused by other run summaries (`scratchlm compare`).
Not for computing any figure: callers read them from a run's own files and hand them in.
"""

from __future__ import annotations

import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from scratchlm.files import atomic_write_bytes, atomic_write_text

# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass
class Paragraph:
    text: str  # plain text; rendered escaped in HTML


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str | None = None


@dataclass
class Image:
    path: str  # relative to the report's directory
    alt: str


@dataclass
class Code:
    text: str
    language: str = ""
    title: str | None = None


@dataclass
class KeyValues:
    items: list[tuple[str, Any]]


@dataclass
class TokenSample:
    pieces: list[str]  # the text of each token, in order
    caption: str | None = None


Block = Paragraph | Table | Image | Code | KeyValues | TokenSample


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def paragraph(self, text: str) -> "Section":
        self.blocks.append(Paragraph(text))
        return self

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> "Section":
        self.blocks.append(Table(list(headers), [list(r) for r in rows], caption))
        return self

    def image(self, path: str, alt: str) -> "Section":
        self.blocks.append(Image(path, alt))
        return self

    def code(self, text: str, language: str = "", title: str | None = None) -> "Section":
        self.blocks.append(Code(text, language, title))
        return self

    def key_values(self, items: Iterable[tuple[str, Any]] | dict) -> "Section":
        pairs = list(items.items()) if isinstance(items, dict) else list(items)
        self.blocks.append(KeyValues(pairs))
        return self

    def tokens(self, pieces: Sequence[str], caption: str | None = None) -> "Section":
        self.blocks.append(TokenSample(list(pieces), caption))
        return self


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)
    intro: str = ""

    def section(self, title: str) -> Section:
        s = Section(title)
        self.sections.append(s)
        return s

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        if self.intro:
            out += [self.intro, ""]
        for s in self.sections:
            out += [f"## {s.title}", ""]
            for block in s.blocks:
                out += _markdown_block(block) + [""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{_esc(self.title)}</h1>"]
        if self.intro:
            body.append(f"<p>{_esc(self.intro)}</p>")
        body.append("<nav><ul>" + "".join(
            f'<li><a href="#{_anchor(s.title)}">{_esc(s.title)}</a></li>' for s in self.sections) + "</ul></nav>")
        for s in self.sections:
            body.append(f'<h2 id="{_anchor(s.title)}">{_esc(s.title)}</h2>')
            body.extend(_html_block(block) for block in s.blocks)
        return HTML_PAGE.format(title=_esc(self.title), css=CSS, body="\n".join(body))

    def write(self, out_dir: str | os.PathLike, name: str = "report") -> tuple[Path, Path]:
        """Write `name.md` and `name.html` into `out_dir` (atomically); image paths are relative to it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, page = out_dir / f"{name}.md", out_dir / f"{name}.html"
        atomic_write_text(md, self.to_markdown())
        atomic_write_text(page, self.to_html())
        return md, page


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Table):
        lines = [f"*{block.caption}*", ""] if block.caption else []
        lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
        lines.append("|" + "|".join("---" for _ in block.headers) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return lines
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.path})"]
    if isinstance(block, Code):
        fence = "````" if "```" in block.text else "```"
        lines = [f"**{block.title}**", ""] if block.title else []
        return lines + [f"{fence}{block.language}", block.text.rstrip("\n"), fence]
    if isinstance(block, KeyValues):
        return [f"- **{k}**: {format_value(v)}" for k, v in block.items]
    if isinstance(block, TokenSample):
        shown = "|" + "|".join(_visible(p) for p in block.pieces) + "|"
        lines = [f"*{block.caption}*", ""] if block.caption else []
        fence = "````" if "```" in shown else "```"
        return lines + [fence, shown, fence]
    raise TypeError(f"unknown report block {type(block).__name__}")


def _visible(piece: str) -> str:
    """A token's text with newlines and tabs shown, so token boundaries stay visible on one line."""
    return piece.replace("\n", "\\n").replace("\t", "\\t")


# ---------------------------------------------------------------------------------------------
# HTML

# Pale colours that keep black text readable; consecutive tokens never share one.
TOKEN_COLOURS = ("#ffd6d6", "#d6f0ff", "#dcffd6", "#fff3c4", "#ead6ff", "#ffe0c2", "#d6fff5")

CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.7; background: #fafafa; padding: 0.6rem; }
.tokens span { border-radius: 2px; }
img { max-width: 100%; }
caption { caption-side: top; font-style: italic; text-align: left; }
"""

HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>
<body>
{body}
</body></html>
"""


def _esc(value: Any) -> str:
    return html.escape(format_value(value))


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_esc(block.text)}</p>"
    if isinstance(block, Table):
        caption = f"<caption>{_esc(block.caption)}</caption>" if block.caption else ""
        head = "".join(f"<th>{_esc(h)}</th>" for h in block.headers)
        rows = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, Image):
        return f'<p><img src="{html.escape(block.path)}" alt="{html.escape(block.alt)}"></p>'
    if isinstance(block, Code):
        title = f"<p><strong>{_esc(block.title)}</strong></p>" if block.title else ""
        return f"{title}<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, KeyValues):
        items = "".join(f"<li><strong>{_esc(k)}</strong>: {_esc(v)}</li>" for k, v in block.items)
        return f"<ul>{items}</ul>"
    if isinstance(block, TokenSample):
        spans = "".join(
            f'<span style="background:{TOKEN_COLOURS[i % len(TOKEN_COLOURS)]}" title="token {i}">'
            f"{html.escape(p)}</span>"
            for i, p in enumerate(block.pieces))
        caption = f"<p><em>{_esc(block.caption)}</em></p>" if block.caption else ""
        return f'{caption}<div class="tokens">{spans}</div>'
    raise TypeError(f"unknown report block {type(block).__name__}")


# ---------------------------------------------------------------------------------------------
# Values, plots, token samples


def format_value(value: Any) -> str:
    """Numbers to a readable precision (4 significant digits for floats), None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def line_plot(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]],
              xlabel: str, ylabel: str, title: str = "", logy: bool = False) -> Path | None:
    """Draw named (xs, ys) curves into a PNG at `path` (atomically); None when there is nothing to draw."""
    series = {name: (list(xs), list(ys)) for name, (xs, ys) in series.items() if len(xs) and len(ys)}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=100)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        style = "o-" if len(xs) <= 12 else "-"
        ax.plot(xs, ys, style, label=name, linewidth=1, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def token_pieces(tokenizer, text: str) -> list[str]:
    """The text of each token of `text` (a token cut inside a UTF-8 character shows U+FFFD)."""
    return [tokenizer.decode_bytes([i]).decode("utf-8", errors="replace") for i in tokenizer.encode(text)]
