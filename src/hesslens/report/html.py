"""One self-contained HTML page from sections of paragraphs, tables and figures.

The page has no external assets: styles are inline, figures are embedded as base64 PNG
(``<img src="data:image/png;base64,...">``), so it opens offline in any browser and can be
mailed as one file. Studies build a :class:`Report` from :class:`Section` objects; any study
(the layer study, the training study, a comparison) adds its own sections with the same blocks.

Example:
    >>> r = Report("Demo", subtitle="a test")
    >>> s = r.section("Numbers", Paragraph("Two rows."),
    ...               Table(["layer", "value"], [["a", 1.0], ["b", 0.25]]))
    >>> html = r.render()
    >>> html.startswith("<!DOCTYPE html>"), "<table" in html, "Two rows." in html
    (True, True, True)

Links and verdict badges go inside paragraphs (a list of texts and blocks) and table cells:

    >>> Paragraph(["See ", Link("the study", "study/sgd/report.html"), "."]).render()
    '<p>See <a href="study/sgd/report.html">the study</a>.</p>'
    >>> Badge("did not hold").render()
    '<span class="badge badge-did-not-hold">did not hold</span>'

What a reader needs at a glance stays in view; the rest folds away under HTML ``<details>``:
a table's extra columns (``Table(..., fold=[...])``), and the numbers behind each row of a
:class:`FoldingTable`, whose rows open on a click:

    >>> t = FoldingTable(["verdict", "finding"], [([Badge("held"), "It held."],
    ...                                            [Paragraph("All the numbers.")])])
    >>> html = t.render()
    >>> html.count("<details"), "All the numbers." in html
    (1, True)
"""

from __future__ import annotations

import base64
import html as _html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hesslens.errors import HesslensInputError
from hesslens.files import write_text
from hesslens.version import __version__

__all__ = [
    "Badge",
    "Block",
    "Code",
    "Details",
    "Figure",
    "FoldingTable",
    "Link",
    "Paragraph",
    "Report",
    "Section",
    "Strong",
    "Table",
    "format_value",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def format_value(value: Any, fmt: str = ".4g") -> str:
    """A table cell as text: floats with ``fmt``, ``None``/NaN as an en dash, booleans as
    yes/no.

    >>> format_value(0.000123456), format_value(None), format_value(True), format_value(12)
    ('0.0001235', '–', 'yes', '12')
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return format(value, fmt)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return format_value(value.item(), fmt)
        except (TypeError, ValueError):
            pass
    return str(value)


class Block:
    """A piece of a section; subclasses render themselves as HTML."""

    def render(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _inline(part: Any) -> str:
    return part.render() if isinstance(part, Block) else _html.escape(str(part))


def _inlines(text: Any) -> str:
    """A text, an inline block, or a list of texts and inline blocks, as HTML."""
    if isinstance(text, (str, Block)):
        return _inline(text)
    return "".join(_inline(p) for p in text)


@dataclass
class Link(Block):
    """A hyperlink (``href`` relative to the page, e.g. a sub-report), inline."""

    text: str
    href: str

    def render(self) -> str:
        return f'<a href="{_html.escape(self.href, quote=True)}">{_html.escape(self.text)}</a>'


@dataclass
class Badge(Block):
    """A coloured label, inline (e.g. a verdict): its CSS class is ``badge-<kind>``, ``kind``
    defaulting to the text (``"held"``, ``"partly"``, ``"did not hold"``, ...)."""

    text: str
    kind: str | None = None

    def render(self) -> str:
        kind = "".join(c if c.isalnum() else "-" for c in (self.kind or self.text).lower())
        return f'<span class="badge badge-{kind}">{_html.escape(self.text)}</span>'


@dataclass
class Strong(Block):
    """Text in bold, inline."""

    text: str

    def render(self) -> str:
        return f"<strong>{_html.escape(self.text)}</strong>"


@dataclass
class Paragraph(Block):
    """A paragraph: text (escaped), a list of texts and inline blocks (:class:`Link`,
    :class:`Badge`), or trusted HTML with ``raw=True``."""

    text: str | Sequence[Any]
    raw: bool = False

    def render(self) -> str:
        body = self.text if self.raw and isinstance(self.text, str) else _inlines(self.text)
        return f"<p>{body}</p>"


@dataclass
class Details(Block):
    """Blocks folded under a one-line ``summary`` (a text, or texts and inline blocks), closed
    until the reader opens them."""

    summary: str | Sequence[Any]
    blocks: Sequence[Block] = ()
    open: bool = False

    def render(self) -> str:
        body = "\n".join(b.render() for b in self.blocks)
        return (f"<details{' open' if self.open else ''}><summary>{_inlines(self.summary)}"
                f"</summary>\n{body}</details>")


@dataclass
class FoldingTable(Block):
    """A table whose rows each open on a click: every row is its cells on one line (texts or
    inline blocks) and, folded under it, blocks shown at the full width of the page (the
    numbers behind the row). ``widths`` are the columns' CSS widths (in ``rem`` or ``px``, so
    that the header lines up with the rows; default: the last column takes what is left)."""

    columns: Sequence[str]
    rows: Sequence[tuple[Sequence[Any], Sequence[Block]]]
    widths: Sequence[str] | None = None

    def render(self) -> str:
        n = len(self.columns)
        widths = list(self.widths or [*(["auto"] * (n - 1)), "1fr"])
        if len(widths) != n:
            raise HesslensInputError(f"{len(widths)} widths for {n} columns")
        grid = f'style="grid-template-columns: 1rem {" ".join(widths)}"'
        out = [f'<div class="folding"><div class="folding-head" {grid}><span></span>'
               + "".join(f"<span>{_html.escape(str(c))}</span>" for c in self.columns)
               + "</div>"]
        for i, (cells, blocks) in enumerate(self.rows):
            if len(cells) != n:
                raise HesslensInputError(f"row {i} has {len(cells)} cells for {n} columns")
            spans = "".join(f"<span>{_inlines(c)}</span>" for c in cells)
            body = "\n".join(b.render() for b in blocks)
            out.append(f'<details class="folding-row"><summary {grid}><span class="marker">'
                       f'</span>{spans}</summary><div class="folded">{body}</div></details>')
        out.append("</div>")
        return "".join(out)


@dataclass
class Code(Block):
    """Preformatted text (settings, a command line), optionally collapsed under a summary."""

    text: str
    summary: str | None = None

    def render(self) -> str:
        pre = f"<pre>{_html.escape(self.text)}</pre>"
        if self.summary:
            return f"<details><summary>{_html.escape(self.summary)}</summary>{pre}</details>"
        return pre


@dataclass
class Table(Block):
    """A table: ``columns`` (header texts) and ``rows`` (sequences, or mappings keyed by the
    column names). Numbers are formatted with ``fmt``; ``highlight`` marks rows (by index).
    Columns named in ``fold`` are left out of the table in view and shown, with all the
    others, in a full table folded under it."""

    columns: Sequence[str]
    rows: Iterable[Sequence[Any] | Mapping[str, Any]]
    caption: str | None = None
    fmt: str = ".4g"
    highlight: Sequence[int] = ()
    fold: Sequence[str] = ()

    def render(self) -> str:
        if not self.fold:
            return self._render(list(self.columns), list(self.rows))
        cols = list(self.columns)
        unknown = [c for c in self.fold if c not in cols]
        if unknown:
            raise HesslensInputError(f"fold names columns the table lacks: {unknown}")
        rows = list(self.rows)
        keep = [i for i, c in enumerate(cols) if c not in self.fold]
        brief = [{cols[i]: (row.get(cols[i]) if isinstance(row, Mapping) else list(row)[i])
                  for i in keep} for row in rows]
        named = ", ".join(str(c) for c in self.fold)
        return (self._render([cols[i] for i in keep], brief)
                + f'<details class="more-columns"><summary>all columns ({_html.escape(named)})'
                f"</summary>{self._render(cols, rows, caption=False)}</details>")

    def _render(self, cols: list[Any], rows: list[Any], caption: bool = True) -> str:
        out = ['<div class="table-wrap"><table>']
        if self.caption and caption:
            out.append(f"<caption>{_html.escape(self.caption)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{_html.escape(str(c))}</th>" for c in cols)
                   + "</tr></thead><tbody>")
        marked = set(self.highlight)
        for i, row in enumerate(rows):
            cells = [row.get(c) for c in cols] if isinstance(row, Mapping) else list(row)
            if len(cells) != len(cols):
                raise HesslensInputError(
                    f"table row {i} has {len(cells)} cells for {len(cols)} columns")
            tds = []
            for v in cells:
                numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
                cls = ' class="num"' if numeric else ""
                text = (v.render() if isinstance(v, Block)
                        else _html.escape(format_value(v, self.fmt)))
                tds.append(f"<td{cls}>{text}</td>")
            tr = '<tr class="hl">' if i in marked else "<tr>"
            out.append(tr + "".join(tds) + "</tr>")
        out.append("</tbody></table></div>")
        return "".join(out)


@dataclass
class Figure(Block):
    """A PNG image embedded as base64, with a caption; ``id`` makes it a link target
    (``Link("figure", "#" + id)``)."""

    png: bytes
    caption: str | None = None
    alt: str = "figure"
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.png, (bytes, bytearray)) or not bytes(self.png).startswith(
                _PNG_MAGIC):
            raise HesslensInputError("Figure needs the bytes of a PNG image")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], caption: str | None = None,
                  alt: str | None = None, id: str | None = None) -> Figure:
        """Read a PNG file (its name is the default alt text)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise HesslensInputError(f"cannot read figure {path}: {err.strerror}") from None
        return cls(data, caption=caption, alt=alt or path.stem.replace("_", " "), id=id)

    def render(self) -> str:
        b64 = base64.b64encode(bytes(self.png)).decode("ascii")
        cap = (f"<figcaption>{_html.escape(self.caption)}</figcaption>"
               if self.caption else "")
        anchor = f' id="{_html.escape(self.id, quote=True)}"' if self.id else ""
        return (f'<figure{anchor}><img src="data:image/png;base64,{b64}" '
                f'alt="{_html.escape(self.alt, quote=True)}">{cap}</figure>')


@dataclass
class Section:
    """A titled part of the report holding blocks, in order."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    id: str | None = None

    def add(self, *blocks: Block) -> Section:
        for b in blocks:
            if not isinstance(b, Block):
                raise HesslensInputError(
                    f"a section holds Paragraph, Table, Figure or Code blocks, not "
                    f"{type(b).__name__}")
        self.blocks.extend(blocks)
        return self

    def anchor(self, index: int) -> str:
        if self.id:
            return self.id
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.title.lower()).strip("-")
        return f"s{index}-{slug}"[:60]

    def render(self, index: int) -> str:
        body = "\n".join(b.render() for b in self.blocks)
        return (f'<section id="{_html.escape(self.anchor(index), quote=True)}">'
                f"<h2>{_html.escape(self.title)}</h2>\n{body}\n</section>")


_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --accent: #1f6fb4; --hl: #fff6d6; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); margin: 0; background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 60px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 0 1px var(--line); }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 28px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 12px; }
nav { font-size: 13.5px; margin: 10px 0 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 12px; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
.table-wrap { overflow-x: auto; margin: 10px 0 18px; }
table { border-collapse: collapse; font-size: 13.5px; min-width: 50%; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 4px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; }
th { background: #eef1f5; font-weight: 600; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.hl td { background: var(--hl); }
figure { margin: 14px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; }
pre { background: #f3f4f7; padding: 10px 12px; overflow-x: auto; font-size: 12.5px; }
details summary { cursor: pointer; color: var(--accent); }
details.more-columns { margin: -10px 0 18px; font-size: 13.5px; }
.folding { margin: 8px 0 14px; font-size: 14px; }
.folding-head, .folding-row > summary { display: grid; gap: 0 12px; align-items: baseline;
    padding: 4px 6px; }
.folding-head { font-weight: 600; background: #eef1f5; font-size: 13.5px; }
.folding-row { border-bottom: 1px solid var(--line); }
.folding-row > summary { list-style: none; color: var(--fg); line-height: 1.35; }
.folding-row > summary::-webkit-details-marker { display: none; }
.folding-row > summary:hover { background: #f6f8fb; }
.folding-row .marker::before { content: "▸"; color: var(--accent); }
.folding-row[open] .marker::before { content: "▾"; }
.folded { padding: 2px 10px 8px 1.9em; font-size: 13.5px; color: #2b3242; }
.folded p { margin: 6px 0; }
:target { scroll-margin-top: 10px; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 40px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-weight: 600;
         font-size: 12.5px; white-space: nowrap; background: #e5e7eb; color: #374151; }
.badge-held { background: #d3f3dc; color: #0b6b2b; }
.badge-partly { background: #fff0c2; color: #7a5a00; }
.badge-did-not-hold { background: #fbd5d5; color: #9b1c1c; }
"""


class Report:
    """A self-contained HTML report: a title, optional subtitle, and sections in order.

    Args:
        title: the page's title and heading.
        subtitle: one line under the heading.
        footer: text at the bottom (default: the time of rendering and hesslens's version).
    """

    def __init__(self, title: str, subtitle: str | None = None, footer: str | None = None):
        self.title = title
        self.subtitle = subtitle
        self.footer = footer
        self.sections: list[Section] = []

    def add(self, section: Section) -> Section:
        """Append a section (e.g. one another study built)."""
        if not isinstance(section, Section):
            raise HesslensInputError(f"expected a Section, got {type(section).__name__}")
        self.sections.append(section)
        return section

    def section(self, title: str, *blocks: Block, id: str | None = None) -> Section:
        """Append a new section with ``blocks`` and return it (add more blocks later)."""
        return self.add(Section(title, id=id).add(*blocks))

    def render(self) -> str:
        """The whole page as a string."""
        nav = " ".join(
            f'<a href="#{_html.escape(s.anchor(i), quote=True)}">{_html.escape(s.title)}</a>'
            for i, s in enumerate(self.sections))
        footer = self.footer or (
            f"Written by hesslens {__version__} on "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_html.escape(self.title)}</title>",
            f"<style>{_CSS}</style></head><body><main>",
            f"<h1>{_html.escape(self.title)}</h1>",
        ]
        if self.subtitle:
            parts.append(f'<p class="subtitle">{_html.escape(self.subtitle)}</p>')
        if len(self.sections) > 1:
            parts.append(f"<nav>{nav}</nav>")
        parts.extend(s.render(i) for i, s in enumerate(self.sections))
        parts.append(f"<footer>{_html.escape(footer)}</footer></main></body></html>\n")
        return "\n".join(parts)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Render and write the page atomically; returns the path."""
        return write_text(path, self.render())
