"""Render the study report as a self-contained HTML page and its Markdown twin.

The page embeds every image as a data URI, so it works offline and can be mailed around as one file; the Markdown
twin links the same images by relative path (``figures/*.png``) for viewing in a repository browser.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}.note{color:#555;font-size:.92em}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
"""


@dataclass(frozen=True)
class Figure:
    """An image file of the report with its caption."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    """One report section: prose paragraphs, tables, figures and preformatted text, in that order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    preformatted: str | None = None


def _data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in record) + "</tr>"
        for record in table.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in record) + " |" for record in table.itertuples(index=False)]
    return "\n".join(lines)


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole report as one HTML document with images inlined."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(subtitle)}</p>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        parts += [_html_table(t) for t in section.tables]
        for figure in section.figures:
            parts.append(f"<figure><img src='{_data_uri(figure.path)}' alt='{html.escape(figure.caption)}'>"
                         f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
        if section.preformatted:
            parts.append(f"<pre>{html.escape(section.preformatted)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, subtitle: str, sections: list[Section], root: Path) -> str:
    """The Markdown twin; images are linked relative to ``root`` (the folder the Markdown file is written to)."""
    parts = [f"# {title}", "", f"_{subtitle}_", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            parts += [paragraph, ""]
        for table in section.tables:
            parts += [_markdown_table(table), ""]
        for figure in section.figures:
            parts += [f"![{figure.caption}]({figure.path.relative_to(root).as_posix()})", "", f"_{figure.caption}_", ""]
        if section.preformatted:
            parts += ["```", section.preformatted.rstrip(), "```", ""]
    return "\n".join(parts)
