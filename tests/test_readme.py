"""README.md as users meet it: renders as intended (CommonMark), its command synopsis
agrees with the argparse parser, and its code blocks marked runnable run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _tokens():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").parse(README.read_text())


def test_readme_renders_headings_and_fences():
    """Every '## ' line outside a fence renders as a heading and no fence swallows one
    (an unbalanced ``` turns the rest of the file into one code block)."""
    toks = _tokens()
    fences = [t for t in toks if t.type == "fence"]
    assert fences, "README has no code blocks"
    for f in fences:
        assert f.info.strip(), f"code block at line {f.map[0] + 1} has no language (a stray fence?)"
        assert not re.search(r"^#{2,3} ", f.content, re.M), \
            f"code block at line {f.map[0] + 1} swallows a heading"
    headings = [toks[i + 1].content for i, t in enumerate(toks) if t.type == "heading_open"]
    for want in ("Command line", "Layout of the code", "Methods and modes", "Versions"):
        assert want in headings
    tables = [t for t in toks if t.type == "table_open"]
    assert tables, "the code-layout table does not render as a table"
