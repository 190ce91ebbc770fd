"""The HTML of the store report (analyses.report): sections with a table of contents, escaped tables, and
figures embedded as base64 PNG, in one self-contained file (no script, no network, no external file).

Every text that comes from the store goes through :func:`esc` (run names, label sets, generated text ...).

Example::

    page = Page("Store report")
    section = page.section("Runs")
    section.add(table([{"run": "r", "examples": 12}]))
    Path("report.html").write_text(page.html())
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from decimal import Decimal

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { border-bottom: 2px solid #446; }
h2 { border-bottom: 1px solid #99a; margin-top: 2em; }
nav ol { line-height: 1.5; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eef; }
caption { caption-side: top; text-align: left; font-weight: bold; color: #446; padding: 2px 0; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { white-space: nowrap; }
figure { margin: 0.8em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.absent { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.4em 0.8em; }
.absent code, p code { background: #f3f3f3; padding: 0 3px; }
.note { color: #555; font-size: 0.9em; }
"""


def esc(value) -> str:
    """HTML-escaped text of any value (None as an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    return f"<td>{esc(value)}</td>"


def table(rows: list[dict], *, caption: str | None = None) -> str:
    """An HTML table of row dicts (columns from the first row), every value escaped."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    title = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png: bytes, caption: str) -> str:
    """A figure from PNG bytes (analyses.figures.png_bytes), embedded as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def absent(what: str, command: str) -> str:
    """A note that the store holds no ``what``, with the command that makes it."""
    return f'<p class="absent">This store holds no {esc(what)}. Make it with <code>{esc(command)}</code>.</p>'


@dataclass
class Section:
    """A titled part of the page; ``parts`` are HTML snippets, ``children`` subsections (in the contents)."""

    id: str
    title: str
    parts: list[str] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)
    page: Page | None = field(default=None, repr=False)

    def add(self, snippet: str) -> None:
        self.parts.append(snippet)

    def section(self, title: str) -> Section:
        child = Section(self.page.new_id(title), title, page=self.page)
        self.children.append(child)
        return child

    def html(self, level: int) -> str:
        inner = "".join(self.parts) + "".join(child.html(level + 1) for child in self.children)
        return f'<section id="{self.id}"><h{level}>{esc(self.title)}</h{level}>{inner}</section>'

    def toc(self) -> str:
        sub = "".join(child.toc() for child in self.children)
        return f'<li><a href="#{self.id}">{esc(self.title)}</a>{f"<ol>{sub}</ol>" if sub else ""}</li>'


@dataclass
class Page:
    """The report page: a title, an introduction, and top-level sections."""

    title: str
    intro: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)

    def new_id(self, title: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:48] or "section"
        candidate, n = base, 1
        while candidate in self._ids:
            n += 1
            candidate = f"{base}-{n}"
        self._ids.add(candidate)
        return candidate

    def section(self, title: str) -> Section:
        section = Section(self.new_id(title), title, page=self)
        self.sections.append(section)
        return section

    def html(self) -> str:
        toc = "".join(section.toc() for section in self.sections)
        body = "".join(section.html(2) for section in self.sections)
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(self.title)}</h1>{''.join(self.intro)}"
            f'<nav id="contents"><h2>Contents</h2><ol>{toc}</ol></nav>{body}</body></html>\n'
        )
