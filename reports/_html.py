"""The report page: one self-contained ``index.html`` (inline CSS, no scripts, relative links only).

The constraint: the page is opened from the file system, mailed around and archived with the run, and
every dataset, concept, layer and model name in it comes from data or config — so nothing is fetched
from the network, every link is a relative, percent-encoded path, and every string passes through
:func:`esc` (``html.escape`` with quotes) on its way into the markup. Builders return HTML fragments;
:class:`Page` assembles sections and a table of contents.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping, Sequence
from urllib.parse import quote

from ._tables import PaperTable

__all__ = ["esc", "link", "Page", "Section", "UnitCard", "table_html", "figure_html", "gallery_html",
           "definition_list"]

_CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d0d4d9; --bg:#ffffff; --panel:#f6f7f9; --accent:#0b5cad; }
* { box-sizing: border-box; }
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
header { background: var(--panel); border-bottom: 1px solid var(--line); padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 24px; }
header p { margin: 2px 0; color: var(--muted); }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 48px; }
nav.toc { columns: 2; font-size: 14px; margin: 12px 0 8px; }
nav.toc a { display: block; padding: 1px 0; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: 4px; margin-top: 36px; font-size: 20px; }
h3 { margin: 24px 0 6px; font-size: 16px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
p.caption, p.note { color: var(--muted); font-size: 13.5px; margin: 4px 0 10px; }
.downloads { font-size: 13px; margin: 2px 0 8px; } .downloads a { margin-right: 10px; }
.tablewrap { overflow-x: auto; }
table.paper { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 4px; }
table.paper caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 4px; }
table.paper thead th { border-top: 2px solid var(--fg); border-bottom: 1px solid var(--fg); padding: 4px 10px;
                       text-align: left; vertical-align: bottom; max-width: 11em; }
table.paper tbody td { padding: 3px 10px; white-space: nowrap; }
table.paper tbody td.prose { white-space: normal; min-width: 16em; }
table.paper tbody tr:last-child td { border-bottom: 2px solid var(--fg); }
table.paper tr.rule td { border-bottom: 1px solid var(--line); }
table.paper .num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; max-width: 900px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 4px; padding: 6px; background: var(--panel); }
.card img { width: 100%; height: auto; display: block; image-rendering: auto; }
.card .title { font-weight: 600; font-size: 13.5px; }
.card .meta { color: var(--muted); font-size: 12.5px; }
.card.dim { background: #fff; border-style: dashed; }
.card.dim .title { color: var(--muted); font-weight: 500; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 14px; margin: 8px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
.empty { color: var(--muted); font-style: italic; }
.warning { color: #9a3412; font-weight: 600; }
"""


def esc(text: Any) -> str:
    """HTML-escape any value (``& < > " '``) for text and attribute positions."""
    return html.escape(str(text), quote=True)


def link(path: str | PurePosixPath) -> str:
    """A relative link target: POSIX path, percent-encoded, then HTML-escaped for an attribute."""
    raw = str(path).replace("\\", "/")
    posix = str(PurePosixPath(raw))
    if posix.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", raw):
        raise ValueError(f"report links must be relative paths inside the output folder, got {path!r}")
    return esc(quote(posix, safe="/._-~"))


#: a text column with a cell longer than this many characters wraps in the HTML table
_PROSE_CHARS = 48


def table_html(table: PaperTable, downloads: Mapping[str, str] | None = None) -> str:
    """A :class:`PaperTable` as an HTML table with its caption, notes and download links."""
    numeric = table.numeric_columns()
    parts = [f'<h3 id="{esc("table-" + table.name)}">{esc(table.title)}</h3>']
    if table.caption:
        parts.append(f'<p class="caption">{esc(table.caption)}</p>')
    if downloads:
        items = " ".join(f'<a href="{link(p)}">{esc(fmt)}</a>' for fmt, p in downloads.items())
        parts.append(f'<div class="downloads">Download: {items}</div>')
    head = "".join(f'<th class="{"num" if num else ""}">{esc(c)}</th>' for c, num in zip(table.columns, numeric))
    body = []
    rules = set(table.rules_after)
    texts = [[table.cell_text(v, j) for j, v in enumerate(row)] for row in table.rows]
    # columns of sentences (a finding's measurements, its test) wrap; numbers and short labels stay on one line,
    # so the table fits the page instead of hiding its last columns (the verdict) behind a scroll bar
    kinds = ["num" if num else ("prose" if any(len(r[j]) > _PROSE_CHARS for r in texts) else "")
             for j, num in enumerate(numeric)]
    for i, row in enumerate(texts):
        cells = "".join(f'<td class="{kind}">{esc(text)}</td>' for text, kind in zip(row, kinds))
        body.append(f'<tr class="rule">{cells}</tr>' if i in rules else f"<tr>{cells}</tr>")
    if not table.rows:
        body.append(f'<tr><td class="empty" colspan="{len(table.columns)}">no rows</td></tr>')
    parts.append(f'<div class="tablewrap"><table class="paper"><thead><tr>{head}</tr></thead>'
                 f'<tbody>{"".join(body)}</tbody></table></div>')
    for note in table.notes:
        parts.append(f'<p class="note">{esc(note)}</p>')
    return "\n".join(parts)


def figure_html(src: str, caption: str, *, alt: str | None = None, width: int | None = None) -> str:
    """An ``<figure>`` with a relative image link and an escaped caption."""
    style = f' style="max-width:{int(width)}px"' if width else ""
    return (f'<figure><a href="{link(src)}"><img src="{link(src)}" alt="{esc(alt or caption)}"{style} '
            f'loading="lazy"></a><figcaption>{esc(caption)}</figcaption></figure>')


@dataclass
class UnitCard:
    """One unit in a gallery: its exemplar strip, a title line and detail lines (all plain text)."""

    image: str | None
    title: str
    lines: Sequence[str] = ()
    dim: bool = False


def gallery_html(cards: Sequence[UnitCard]) -> str:
    if not cards:
        return '<p class="empty">no units to show</p>'
    out = ['<div class="gallery">']
    for card in cards:
        img = f'<img src="{link(card.image)}" alt="{esc(card.title)}" loading="lazy">' if card.image else ""
        meta = "".join(f'<div class="meta">{esc(line)}</div>' for line in card.lines)
        out.append(f'<div class="card{" dim" if card.dim else ""}">{img}<div class="title">{esc(card.title)}</div>'
                   f"{meta}</div>")
    out.append("</div>")
    return "\n".join(out)


def definition_list(items: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


@dataclass
class Section:
    """A titled part of the page; ``body`` holds already-escaped HTML fragments."""

    anchor: str
    title: str
    body: list[str] = field(default_factory=list)

    def add(self, fragment: str) -> "Section":
        self.body.append(fragment)
        return self

    def text(self, paragraph: str, cls: str | None = None) -> "Section":
        klass = f' class="{esc(cls)}"' if cls else ""
        self.body.append(f"<p{klass}>{esc(paragraph)}</p>")
        return self

    def heading(self, title: str, anchor: str | None = None) -> "Section":
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.body.append(f"<h3{ident}>{esc(title)}</h3>")
        return self


@dataclass
class Page:
    """The whole page: title, subtitle lines, then sections with a table of contents."""

    title: str
    subtitle: Sequence[str] = ()
    sections: list[Section] = field(default_factory=list)

    def section(self, anchor: str, title: str) -> Section:
        sec = Section(anchor, title)
        self.sections.append(sec)
        return sec

    def render(self) -> str:
        toc = "".join(f'<a href="#{esc(quote(s.anchor))}">{esc(s.title)}</a>' for s in self.sections)
        sub = "".join(f"<p>{esc(line)}</p>" for line in self.subtitle)
        body = "\n".join(
            f'<section id="{esc(s.anchor)}"><h2>{esc(s.title)}</h2>\n' + "\n".join(s.body) + "\n</section>"
            for s in self.sections
        )
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(self.title)}</h1>{sub}</header>\n<main>\n"
            f'<nav class="toc">{toc}</nav>\n{body}\n</main>\n</body>\n</html>\n'
        )
