"""README.md and docs/ as users meet them: they render as intended (CommonMark), the README
is a short front door with the two commands CI runs, every link resolves, the command
synopsis agrees with the argparse parser, the deployable table agrees with
experiments/results/frontier.csv, no page or script carries a work-log tag, and the code
blocks marked runnable run as written."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
RESULTS = ROOT / "experiments" / "RESULTS.md"
FRONTIER = ROOT / "experiments" / "results" / "frontier.csv"
COMMANDS = ("bash experiments/setup_env.sh && .venv/bin/countdown-jax demo",
            "bash experiments/setup_env.sh && .venv/bin/python -m pytest -q")
MAX_README_LINES = 150
# "session 9", "S10-F", "run S3-F", "(S8)": labels of the work log, not of a measurement.
WORK_LOG_TAG = re.compile(r"\b[Ss]ession \d|\bS\d{1,2}-[A-Z]\b|\bruns? S\d|\bS\d{1,2}\b")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _tokens(page: Path):
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").parse(page.read_text())


def _headings(toks) -> list[str]:
    return [toks[i + 1].content for i, t in enumerate(toks) if t.type == "heading_open"]


def _section_fences(page: Path, heading: str) -> list[str]:
    """The code blocks between ``heading`` and the next heading of the same or a higher
    level."""
    toks = _tokens(page)
    start = next(i for i, t in enumerate(toks)
                 if t.type == "heading_open" and toks[i + 1].content == heading)
    level = toks[start].tag
    out = []
    for t in toks[start + 1:]:
        if t.type == "heading_open" and t.tag <= level:
            break
        if t.type == "fence":
            out.append(t.content)
    return out


# ------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_page_renders_headings_and_fences(page):
    """One title; every fence has a language and swallows no heading (an unbalanced ```
    turns the rest of the file into one code block)."""
    toks = _tokens(page)
    titles = [t for t in toks if t.type == "heading_open" and t.tag == "h1"]
    assert len(titles) == 1, f"{_rel(page)}: want one '# ' title, got {len(titles)}"
    for f in (t for t in toks if t.type == "fence"):
        where = f"{_rel(page)} line {f.map[0] + 1}"
        assert f.info.strip(), f"code block at {where} has no language (a stray fence?)"
        assert not re.search(r"^#{2,3} ", f.content, re.M), \
            f"code block at {where} swallows a heading"


def test_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    first_screen = "\n".join(text.splitlines()[:40])
    assert "experiments/results/frontier_" in first_screen, "no result on the first screen"
    assert "| rule | SmolLM2-135M | Gemma-3-270M |" in first_screen
    headings = _headings(_tokens(README))
    for want in ("Two commands", "Library", "Use it in your Flax model", "Documentation"):
        assert want in headings


def test_readme_two_commands_are_the_ones_ci_runs():
    block = "\n".join(_section_fences(README, "Two commands"))
    lines = [ln.strip() for ln in block.splitlines()]
    for command in COMMANDS:
        assert command in lines, f"README's two commands miss `{command}`"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert COMMANDS[1] in (ln.strip() for ln in ci), ".ci/run must run command 2 verbatim"


# ------------------------------------------------------------------------- links

def _targets(page: Path) -> list[str]:
    out = []

    def walk(tokens):
        for t in tokens:
            if t.type == "link_open":
                out.append(t.attrs["href"])
            elif t.type == "image":
                out.append(t.attrs["src"])
            if t.children:
                walk(t.children)

    walk(_tokens(page))
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page):
    targets = [t for t in _targets(page) if not re.match(r"[a-z]+:", t)]
    for target in targets:
        path = target.split("#", 1)[0]
        if not path:
            continue
        assert (page.parent / path).exists(), f"{_rel(page)} links to missing {target}"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t).resolve() for t in _targets(README)
              if not re.match(r"[a-z]+:", t)}
    missing = [_rel(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# ------------------------------------------------------------------------- work-log tags

def _tag_scope() -> list[Path]:
    files = [*PAGES, *sorted((ROOT / "conversion").rglob("*.py")),
             *sorted((ROOT / "countdown_jax").rglob("*.py"))]
    files += sorted((ROOT / "experiments").glob("*.py"))
    files += sorted((ROOT / "experiments" / "bench").glob("*.py"))
    return files


def test_no_work_log_tags():
    hits = []
    for path in _tag_scope():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if WORK_LOG_TAG.search(line):
                hits.append(f"{_rel(path)}:{n}: {line.strip()}")
    assert not hits, "work-log tags (name a run by card and date, or by its results " \
                     "file):\n" + "\n".join(hits)


def test_the_tag_pattern_catches_work_log_labels():
    for tag in ("session 9", "Session 10", "S10-F", "run S3-F", "(S8)", "runs S4-A..C"):
        assert WORK_LOG_TAG.search(tag), tag
    for clean in ("H200, 2026-11-30", "bench_decode.md", "bn64-bd128-s4", "GPUs", "SSE"):
        assert not WORK_LOG_TAG.search(clean), clean


# ------------------------------------------------------------------------- command line

def _synopses() -> dict[str, str]:
    """{command: its synopsis with continuation lines joined and comments dropped}."""
    text = re.sub(r"\\\n", " ", "\n".join(_section_fences(ROOT / "docs" / "cli.md",
                                                          "Synopsis")))
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("countdown-jax "):
            out[line.split()[1]] = line
    return out


def test_cli_synopsis_matches_the_parser():
    """Every command has a synopsis in docs/cli.md, or its own page docs/<command>.md that
    cli.md links; every option a synopsis names exists with those choices, an option taking
    several values shows '[X ...]', required options are shown."""
    from countdown_jax import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    synopses = _synopses()
    assert set(synopses) <= set(sub.choices), "docs/cli.md: synopses of unknown commands"
    cli_links = set(_targets(ROOT / "docs" / "cli.md"))
    for name in set(sub.choices) - set(synopses):
        assert f"{name}.md" in cli_links and (ROOT / "docs" / f"{name}.md").is_file(), \
            f"`countdown-jax {name}` has neither a synopsis in docs/cli.md nor a linked page"
    for name, line in synopses.items():
        actions = {o: a for a in sub.choices[name]._actions for o in a.option_strings}
        words = line.replace("[", " ").replace("]", " ").replace("(", " ").replace(")", " ") \
            .split()
        for i, w in enumerate(words):
            if not w.startswith("--"):
                continue
            assert w in actions, f"docs/cli.md: `{name} {w}` is not an option of the CLI"
            a = actions[w]
            value = words[i + 1] if i + 1 < len(words) else ""
            if a.choices is not None and "|" in value:
                assert set(value.split("|")) == set(map(str, a.choices)), \
                    f"docs/cli.md: `{name} {w} {value}` vs CLI choices {list(a.choices)}"
            if a.nargs == "+":
                assert re.search(re.escape(w) + r" \S+ \[(\S+ )?\.\.\.\]", line), \
                    f"docs/cli.md: `{name} {w}` takes several values; show `X [X ...]`"
        for a in sub.choices[name]._actions:
            if a.required and a.option_strings:
                assert any(o in words for o in a.option_strings), \
                    f"docs/cli.md: `{name}` synopsis misses required {a.option_strings[0]}"


# ------------------------------------------------------------------------- deployable table

BUDGETS = (0.03, 0.05, 0.10)
MC_POINT = 0.01
ROW_RULES = {"proxy, 4-bit": "d_countdown-proxy-4bit", "proxy, 2-bit": "d_countdown-proxy-2bit",
             "allocated proxy, 4-bit": "d_countdown-alloc-proxy-4bit",
             "allocated CATS": "cats-alloc", "allocated M-COUNTDOWN": "m_countdown-alloc",
             "cascade, rank-64": "d_countdown-cascade-rank64", "CATS,": "cats-practical",
             "M-COUNTDOWN,": "m_countdown-practical",
             "D-COUNTDOWN, rank-64": "d_countdown-practical-rank64"}
TABLE_MODELS = ("smollm2", "gemma3")


def _frontier():
    """{model: {rule: [(bytes_share, ppl / dense ppl, mean MC acc_norm or None)]}} and
    {model: dense mean MC acc_norm}."""
    settings = defaultdict(dict)
    with FRONTIER.open() as f:
        for row in csv.DictReader(f):
            # a run's policy index and the target r: runs of other budgets of one rule
            key = (row["model"], row["rule"], row["policy_index"], row["sparsity_target"])
            settings[key]["bytes"] = float(row["bytes_share"])
            settings[key][(row["task"], row["metric"])] = float(row["score"])
    dense = {m: v for (m, rule, *_), v in settings.items() if rule == "dense"}
    points = defaultdict(lambda: defaultdict(list))
    for (m, rule, *_), v in settings.items():
        ppl = v[("boolq_ppl", "ppl")] / dense[m][("boolq_ppl", "ppl")]
        points[m][rule].append((v["bytes"], ppl, v.get(("mc_mean", "acc_norm"))))
    return points, {m: d[("mc_mean", "acc_norm")] for m, d in dense.items()}


def _deployable_rows(page: Path) -> dict[str, list[str]]:
    """{rule label: [cell, ...]} of the table headed '| rule | SmolLM2-135M | ...'."""
    lines = page.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines)
                 if ln.startswith("| rule | SmolLM2-135M | Gemma-3-270M |"))
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("page", [README, RESULTS], ids=_rel)
def test_deployable_table_matches_frontier_csv(page):
    """Each cell 'a / b / c' is the smallest bytes share a rule reaches with perplexity
    within +3 / +5 / +10% of dense among the measured settings ('-': none), that point is
    within one point of dense mean MC accuracy, and every practical rule scored on all
    MC tasks has a row."""
    points, dense_mc = _frontier()
    rows = _deployable_rows(page)
    rules = {}
    for label in rows:
        match = [r for prefix, r in ROW_RULES.items() if label.startswith(prefix)]
        assert len(match) == 1, f"{_rel(page)}: no frontier rule for row {label!r}"
        rules[label] = match[0]
    scored = {rule for m in TABLE_MODELS for rule, pts in points[m].items()
              if rule != "dense" and "ideal" not in rule and all(p[2] is not None for p in pts)}
    assert scored == set(rules.values()), f"{_rel(page)}: rows vs scored rules {sorted(scored)}"
    for label, cells in rows.items():
        for model, cell in zip(TABLE_MODELS, cells):
            shown = [c.strip().strip("*") for c in cell.split("/")]
            assert len(shown) == len(BUDGETS), f"{_rel(page)} {label} {model}: {cell!r}"
            for budget, value in zip(BUDGETS, shown):
                ok = [p for p in points[model][rules[label]] if p[1] <= 1 + budget]
                where = f"{_rel(page)} {label}, {model}, +{budget:.0%}"
                if not ok:
                    assert value == "-", f"{where}: no setting is within budget, shown {value}"
                    continue
                best = min(ok)
                assert value != "-", f"{where}: {best[0]:.3f} is within budget"
                assert value == f"{best[0]:.2f}", f"{where}: {value} vs {best[0]:.4f}"
                assert best[2] >= dense_mc[model] - MC_POINT, f"{where}: MC {best[2]:.3f}"


def test_results_and_readme_tables_agree():
    assert _deployable_rows(README) == _deployable_rows(RESULTS)


# ------------------------------------------------------------------------- runnable blocks

def _runnable_blocks() -> list[tuple[str, str]]:
    """[(where, code)] of every fence preceded by '<!-- runnable -->' (where: 'README-0',
    'docs-library-0', ...)."""
    out = []
    for page in PAGES:
        toks = _tokens(page)
        blocks = [toks[i + 1].content for i, t in enumerate(toks[:-1])
                  if t.type == "html_block" and "<!-- runnable -->" in t.content
                  and toks[i + 1].type == "fence"]
        name = _rel(page).removesuffix(".md").replace("/", "-")
        out += [(f"{name}-{k}", code) for k, code in enumerate(blocks)]
    return out


RUNNABLE = _runnable_blocks()


def test_runnable_blocks_are_marked():
    where = [w for w, _ in RUNNABLE]
    assert sum(w.startswith("README-") for w in where) >= 2
    assert any("cj.sweep(" in code for _, code in RUNNABLE)
    assert any("SparseGatedMLP" in code for w, code in RUNNABLE if w.startswith("README"))


@pytest.mark.slow
@pytest.mark.parametrize("where,code", RUNNABLE, ids=[w for w, _ in RUNNABLE])
def test_runnable_block_runs(where, code, smollm2_dir, capsys):
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert out.strip()
    if "cj.sweep(" in code:
        assert len(re.findall(r"r=0\.\d: realised 0\.\d+", out)) == 3
