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
from hesslens.version import __version__

__all__ = [
    "Badge",
    "Block",
    "Code",
    "Figure",
    "Link",
    "Paragraph",
    "Report",
    "Section",
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
class Paragraph(Block):
    """A paragraph: text (escaped), a list of texts and inline blocks (:class:`Link`,
    :class:`Badge`), or trusted HTML with ``raw=True``."""

    text: str | Sequence[Any]
    raw: bool = False

    def render(self) -> str:
        if isinstance(self.text, str):
            body = self.text if self.raw else _html.escape(self.text)
        else:
            body = "".join(_inline(p) for p in self.text)
        return f"<p>{body}</p>"


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
    column names). Numbers are formatted with ``fmt``; ``highlight`` marks rows (by index)."""

    columns: Sequence[str]
    rows: Iterable[Sequence[Any] | Mapping[str, Any]]
    caption: str | None = None
    fmt: str = ".4g"
    highlight: Sequence[int] = ()

    def render(self) -> str:
        cols = list(self.columns)
        out = ['<div class="table-wrap"><table>']
        if self.caption:
            out.append(f"<caption>{_html.escape(self.caption)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{_html.escape(str(c))}</th>" for c in cols)
                   + "</tr></thead><tbody>")
        marked = set(self.highlight)
        for i, row in enumerate(self.rows):
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
    """A PNG image embedded as base64, with a caption."""

    png: bytes
    caption: str | None = None
    alt: str = "figure"

    def __post_init__(self) -> None:
        if not isinstance(self.png, (bytes, bytearray)) or not bytes(self.png).startswith(
                _PNG_MAGIC):
            raise HesslensInputError("Figure needs the bytes of a PNG image")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], caption: str | None = None,
                  alt: str | None = None) -> Figure:
        """Read a PNG file (its name is the default alt text)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise HesslensInputError(f"cannot read figure {path}: {err.strerror}") from None
        return cls(data, caption=caption, alt=alt or path.stem.replace("_", " "))

    def render(self) -> str:
        b64 = base64.b64encode(bytes(self.png)).decode("ascii")
        cap = (f"<figcaption>{_html.escape(self.caption)}</figcaption>"
               if self.caption else "")
        return (f'<figure><img src="data:image/png;base64,{b64}" '
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
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 0 1px var(--line); }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 12px; }
nav { font-size: 14px; margin: 10px 0 18px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
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
        from hesslens.files import write_text

        return write_text(path, self.render())
