"""One self-contained HTML file: a summary table, then sections of figures, tables and text.

Figures are PNG files (or bytes) embedded as ``data:image/png;base64`` URIs; the page loads
nothing else (inline CSS, no scripts, no external assets). All text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { width: 14em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
p.note { color: #555; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Figure:
    """A PNG to embed: a file path, the PNG bytes, or a ``matplotlib.figure.Figure`` (rendered
    to PNG when the page is written)."""

    image: Any
    caption: str = ""

    def png_bytes(self) -> bytes:
        if isinstance(self.image, bytes):
            return self.image
        if hasattr(self.image, "savefig"):  # a matplotlib figure
            buffer = io.BytesIO()
            self.image.savefig(buffer, format="png", dpi=120)
            return buffer.getvalue()
        return Path(self.image).read_bytes()


@dataclass(frozen=True)
class Table:
    """Rows of cells under ``columns``; cells are formatted by :func:`format_value`."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """A heading with an optional note, figures, tables and preformatted text, in that order."""

    title: str
    note: str = ""
    figures: Sequence[Figure] = field(default_factory=tuple)
    tables: Sequence[Table] = field(default_factory=tuple)
    text: str = ""


def format_value(value: Any, digits: int = 4) -> str:
    """Plain text for a cell: floats to ``digits`` significant digits, None as an en dash,
    lists joined by commas, dicts as ``key=value`` pairs."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "\u2013"
        return f"{value:.{digits}g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={format_value(item, digits)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item, digits) for item in value)
    return str(value)


def _cell(value: Any, tag: str = "td") -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    css = ' class="num"' if numeric and tag == "td" else ""
    return f"<{tag}{css}>{html.escape(format_value(value))}</{tag}>"


def _table(table: Table, css_class: str = "") -> str:
    parts = [f'<table class="{css_class}">' if css_class else "<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    parts.append("<thead><tr>" + "".join(_cell(column, "th") for column in table.columns) + "</tr></thead><tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(_cell(value) for value in row) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _summary(summary: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{html.escape(str(key))}</th>{_cell(value)}</tr>" for key, value in summary.items()]
    return '<table class="summary"><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png_bytes()).decode("ascii")
    alt = html.escape(figure.caption or "figure", quote=True)
    caption = f"<figcaption>{html.escape(figure.caption)}</figcaption>" if figure.caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{caption}</figure>'


def _section(section: Section) -> str:
    parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
    if section.note:
        parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    parts += [_figure(figure) for figure in section.figures]
    parts += [_table(table) for table in section.tables]
    if section.text:
        parts.append(f"<pre>{html.escape(section.text)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def render_report(title: str, summary: Mapping[str, Any], sections: Sequence[Section] = (), *, note: str = "") -> str:
    """The whole page as a string: ``title``, ``note``, the ``summary`` as a key/value table,
    then every section."""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(note + " " if note else "")}Written {html.escape(stamp)}.</p>',
        "<section><h2>Summary</h2>",
        _summary(summary),
        "</section>",
        *(_section(section) for section in sections),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, title: str, summary: Mapping[str, Any], sections: Sequence[Section] = (),
                 *, note: str = "") -> Path:
    """Write :func:`render_report`'s page to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render_report(title, summary, sections, note=note), encoding="utf-8")
    return path
