"""The report card module: one set of blocks rendered as Markdown and HTML, PNG plots, token samples."""

from __future__ import annotations

import html
import re

import pytest

from scratchlm.report import Report, format_value, line_plot, token_pieces


def _sample_report() -> Report:
    r = Report("Card <1>", intro="intro & more")
    s = r.section("Numbers | pipes")
    s.table(["name", "value"], [["a|b", 1.23456], ["c", 1234567], ["d", None]], caption="cap")
    s.key_values({"k": True, "n": 0.5})
    r.section("Code").code("print('<hi>')\n```inner```", "python", "title")
    r.section("Tokens").tokens(["def", " f", "(\n", "<x>"], "4 tokens")
    r.section("Pictures").image("plots/a.png", "a plot")
    return r


def test_markdown_and_html_carry_the_same_sections_and_cells():
    r = _sample_report()
    md, page = r.to_markdown(), r.to_html()
    for section in r.sections:
        assert f"## {section.title}" in md
        assert f">{html.escape(section.title)}</h2>" in page
    # table cells: pipes escaped in Markdown, HTML-escaped in the page, numbers formatted alike
    assert "a\\|b" in md and "<td>a|b</td>" in page
    assert "1.235" in md and "<td>1.235</td>" in page
    assert "1,234,567" in md and "<td>1,234,567</td>" in page
    assert "![a plot](plots/a.png)" in md and 'src="plots/a.png"' in page


def test_html_escapes_user_text_and_code():
    page = _sample_report().to_html()
    assert "<1>" not in page and "&lt;1&gt;" in page
    assert "print(&#x27;&lt;hi&gt;&#x27;)" in page
    assert "<x>" not in page


def test_code_with_a_fence_inside_gets_a_longer_fence():
    md = _sample_report().to_markdown()
    assert "````python" in md


def test_token_sample_colours_neighbours_differently_and_keeps_text():
    page = _sample_report().to_html()
    spans = re.findall(r'<span style="background:(#[0-9a-f]+)" title="token \d+">(.*?)</span>', page, re.S)
    assert [html.unescape(t) for _, t in spans] == ["def", " f", "(\n", "<x>"]
    colours = [c for c, _ in spans]
    assert all(a != b for a, b in zip(colours, colours[1:]))
    md = _sample_report().to_markdown()
    assert "|def| f|(\\n|<x>|" in md  # newlines visible, boundaries marked


def test_write_is_atomic_pair(tmp_path):
    md, page = _sample_report().write(tmp_path, "card")
    assert md.read_text().startswith("# Card <1>")
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob("*.tmp*"))


def test_line_plot_writes_a_png_or_nothing(tmp_path):
    path = line_plot(tmp_path / "p" / "loss.png", {"train": ([1, 2, 3], [3.0, 2.0, 1.5]), "empty": ([], [])},
                     "step", "loss")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert line_plot(tmp_path / "none.png", {"x": ([], [])}, "a", "b") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("value,text", [(None, "–"), (True, "yes"), (0.0, "0"), (2.0, "2"), (1e-7, "1.000e-07"),
                                        (12345.6, "12,346"), (3, "3"), ("x", "x")])
def test_format_value(value, text):
    assert format_value(value) == text


def test_token_pieces_join_back_to_the_text():
    from scratchlm.tokenizer import BPETokenizer

    text = "def add(a, b):\n    return a + b\n" * 20
    tok = BPETokenizer.train([text], 300, progress=False)
    pieces = token_pieces(tok, "def add(x, y):\n    return x\n")
    assert "".join(pieces) == "def add(x, y):\n    return x\n"
    assert len(pieces) == len(tok.encode("def add(x, y):\n    return x\n"))
