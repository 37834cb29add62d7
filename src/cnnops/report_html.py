"""`cnnops report`: one self-contained HTML page, and a Markdown twin for CI comments, of what
the pipeline wrote, with a fit verdict.

    cnnops report --out reports/report.html     # also reports/report.md

The sections (`cnnops.report_sections`) are lists of blocks, rendered twice: as HTML, pictures
inside it as data URIs (it opens offline: no script, no CDN), and as Markdown, pictures linked by
relative path. The figures the report draws itself go to a folder beside it (`report_files/`).
"""

from __future__ import annotations

import html
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops.errors import CnnopsError
from cnnops.runs import read_json, write_bytes

if TYPE_CHECKING:
    from cnnops.config import Config


@dataclass(frozen=True)
class Table:
    header: list[str]
    """All empty: a table of facts, drawn without a header row where the format allows."""
    rows: list[list[Any]]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Note:
    """A piece that is missing or could not be read."""

    text: str


class NotRun(Note):
    """A piece whose stage has not run yet; the text says what to run."""


@dataclass(frozen=True)
class Callout:
    text: str
    tone: str  # good | warn


Block = str | Table | Figure | Note | Callout
"""A str is a paragraph; `code` in backticks stays code in both renderings."""


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    blocks: list[Block]


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


# --- HTML -----------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #1b1f24; margin: 0; background: #f6f7f9; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { margin-bottom: 4px; } .meta { color: #57606a; margin-top: 0; }
nav a { margin-right: 14px; } section { border-top: 1px solid #d0d7de; margin-top: 28px; }
table { border-collapse: collapse; margin: 10px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e5e8eb; text-align: left; }
th { background: #f0f2f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 14px 0; } img { max-width: 100%; height: auto; border: 1px solid #e5e8eb; }
figcaption { color: #57606a; font-size: 13px; }
code { background: #f0f2f4; padding: 0 4px; border-radius: 3px; }
.note { color: #57606a; font-style: italic; border-left: 3px solid #d0d7de; padding-left: 10px; }
.callout { padding: 10px 14px; border-radius: 6px; font-weight: 600; }
.callout.good { background: #dafbe1; } .callout.warn { background: #fff1c2; }
"""


def _inline(text: str) -> str:
    """Escaped, with `code` and **strong** spans."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def _note(note: Note) -> str:
    return f"Not run yet: {note.text}" if isinstance(note, NotRun) else note.text


def _td(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f"<td{' class=num' if numeric else ''}>{_inline(fmt(value))}</td>"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(map(_td, row)) + "</tr>" for row in table.rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(table.header) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _html_block(block: Block) -> str:
    from cnnops.reports import png_data_uri

    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        uri = png_data_uri(block.path)
        if uri is None:
            return _html_block(Note(f"{block.caption}: {block.path.name} is not a readable PNG."))
        caption = html.escape(block.caption)
        return (
            f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
        )
    if isinstance(block, Note):
        return f'<p class="note">{_inline(_note(block))}</p>'
    if isinstance(block, Callout):
        return f'<p class="callout {block.tone}">{_inline(block.text)}</p>'
    return f"<p>{_inline(block)}</p>"


def render_html(title: str, lead: list[str], sections: list[Section]) -> str:
    numbered = [(i, s, html.escape(s.title)) for i, s in enumerate(sections, 1)]
    nav = " ".join(f'<a href="#{s.key}">{i}. {t}</a>' for i, s, t in numbered)
    body = "".join(
        f'<section id="{s.key}"><h2>{i}. {t}</h2>{"".join(map(_html_block, s.blocks))}</section>'
        for i, s, t in numbered
    )
    paragraphs = "".join(f'<p class="meta">{_inline(line)}</p>' for line in lead)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>{paragraphs}<nav>{nav}</nav>{body}</main></body></html>\n"
    )


# --- Markdown -------------------------------------------------------------------------------------


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Table):
        lines = ["| " + " | ".join(block.header) + " |", "|" + " --- |" * len(block.header)]
        cells = ([fmt(c).replace("|", "\\|") for c in row] for row in block.rows)
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    if isinstance(block, Figure):
        return f"![{block.caption}]({Path(os.path.relpath(block.path, base)).as_posix()})"
    if isinstance(block, Note):
        return f"> {_note(block)}"
    if isinstance(block, Callout):
        return f"**{block.text}**"
    return block


def render_markdown(title: str, lead: list[str], sections: list[Section], base: Path) -> str:
    """The same sections as text and tables; pictures linked relative to `base`."""
    parts = [f"# {title}", *lead]
    for i, s in enumerate(sections, 1):
        parts += [f"## {i}. {s.title}", *(_md_block(b, base) for b in s.blocks)]
    return "\n\n".join(parts) + "\n"


# --- the command ----------------------------------------------------------------------------------


def check_out(out: Path) -> Path:
    """`--out` names an HTML file whose folder, and the figures' folder beside it, exist or can
    be made; returns the figures' folder."""
    if out.is_dir():
        raise CnnopsError(
            f"--out {out}: is a folder; name the HTML file, e.g. {out / 'report.html'}"
        )
    if out.suffix.lower() not in (".html", ".htm"):
        raise CnnopsError(f"--out {out}: expected an .html file (the Markdown goes beside it)")
    figures = out.parent / f"{out.stem}_files"
    try:
        figures.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnopsError(f"--out {out}: cannot create {figures} ({e.strerror})") from None
    return figures


def summary(config: Config, verdict: str | None) -> str:
    """The report in one line: the fit, the test accuracy, the gate."""
    folder = config.paths.reports
    scored, gate = read_json(folder / "eval.json") or {}, read_json(folder / "promotion.json")
    parts = [f"Fit: **{verdict or 'not trained yet'}**"]
    if scored.get("test_acc") is not None:
        parts.append(f"test accuracy {fmt(scored['test_acc'])} (version {scored['model_version']})")
    if gate:
        parts.append("promoted to champion" if gate.get("promoted") else "the champion stays")
    return " · ".join(parts) + "."


def write_report(config: Config, out: Path) -> dict[str, Any]:
    """Write `out` (HTML) and its .md twin; return what was written, the fit verdict and the
    sections whose stage has not run yet."""
    from cnnops import report_sections as build
    from cnnops.tracking import git_commit

    figures = check_out(out)
    study, why = build.open_study(config)
    fit, verdict = build.fit_section(config, figures)
    sections = [
        build.data_section(config),
        fit,
        build.evaluation_section(config),
        build.study_section(config, study, why, figures),
        build.registry_section(config),
        build.cost_section(config, study),
        build.insight_section(config),
    ]
    commit = git_commit()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lead = [
        summary(config, verdict),
        f"Generated {when} at commit `{commit[:12]}{commit[40:]}` by `cnnops report`.",
    ]
    title = f"{config.registry.model_name}: {config.model.name} on {config.fetch.source}"
    markdown = out.with_suffix(".md")
    write_bytes(out, render_html(title, lead, sections).encode())
    write_bytes(markdown, render_markdown(title, lead, sections, markdown.parent).encode())
    return {
        "html": str(out),
        "markdown": str(markdown),
        "verdict": verdict,
        "not_run": [s.title for s in sections if any(isinstance(b, NotRun) for b in s.blocks)],
    }
