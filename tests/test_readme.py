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


def _command_block() -> str:
    toks = _tokens()
    start = next(i for i, t in enumerate(toks)
                 if t.type == "heading_open" and toks[i + 1].content == "Command line")
    return next(t for t in toks[start:] if t.type == "fence").content


def _synopses() -> dict[str, str]:
    """{command: its synopsis with continuation lines joined and comments dropped}."""
    text = re.sub(r"\\\n", " ", _command_block())
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("countdown-jax "):
            out[line.split()[1]] = line
    return out


def test_readme_synopsis_matches_the_parser():
    """Every command has a synopsis; every option it names exists with those choices, an
    option taking several values shows '[X ...]', required options are shown."""
    from countdown_jax import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    synopses = _synopses()
    assert set(synopses) == set(sub.choices)
    for name, line in synopses.items():
        actions = {o: a for a in sub.choices[name]._actions for o in a.option_strings}
        words = line.replace("[", " ").replace("]", " ").replace("(", " ").replace(")", " ") \
            .split()
        for i, w in enumerate(words):
            if not w.startswith("--"):
                continue
            assert w in actions, f"README: `{name} {w}` is not an option of the CLI"
            a = actions[w]
            value = words[i + 1] if i + 1 < len(words) else ""
            if a.choices is not None and "|" in value:
                assert set(value.split("|")) == set(map(str, a.choices)), \
                    f"README: `{name} {w} {value}` vs CLI choices {list(a.choices)}"
            if a.nargs == "+":
                assert re.search(re.escape(w) + r" \S+ \[(\S+ )?\.\.\.\]", line), \
                    f"README: `{name} {w}` takes several values; show `X [X ...]`"
        for a in sub.choices[name]._actions:
            if a.required and a.option_strings:
                assert any(o in words for o in a.option_strings), \
                    f"README: `{name}` synopsis misses required {a.option_strings[0]}"


def _runnable_blocks():
    toks = _tokens()
    return [toks[i + 1].content for i, t in enumerate(toks[:-1])
            if t.type == "html_block" and "<!-- runnable -->" in t.content
            and toks[i + 1].type == "fence"]


def test_readme_marks_runnable_blocks():
    blocks = _runnable_blocks()
    assert len(blocks) >= 2 and any("cj.sweep(" in b for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(2))
def test_readme_runnable_block_runs(index, smollm2_dir, capsys):
    code = _runnable_blocks()[index]
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert out.strip()
    if "cj.sweep(" in code:
        assert len(re.findall(r"r=0\.\d: realised 0\.\d+", out)) == 3
