"""A report's content (:class:`Report`) and its rendering as Markdown, self-contained HTML and
terminal text. Knows nothing of MLflow or of what the sections say."""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd


@dataclass
class Report:
    name: str
    kind: str
    out_dir: Path
    sections: List[tuple] = field(default_factory=list)
    """(title, text, Markdown table or "", [PNG paths])."""
    headline: str = ""
    """Printed on the terminal after writing."""
    findings: List[str] = field(default_factory=list)
    images: List[Path] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def add(self, title: str, text: str = "", md_table: str = "", images: Sequence[Optional[Path]] = ()) -> None:
        images = [Path(i) for i in images if i is not None]
        self.sections.append((title, text, md_table, images))
        self.images.extend(images)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}g}"
    try:
        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    return str(v)


def frame_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no rows)_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def frame_text(df: pd.DataFrame) -> str:
    """A plain aligned table for the terminal."""
    if df.empty:
        return "(no rows)"
    cells = [[str(c) for c in df.columns]] + [[fmt(r[c]) for c in df.columns] for _, r in df.iterrows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _meta_line(report: Report) -> str:
    return (f"Kind: {report.kind} · generated {time.strftime('%Y-%m-%d %H:%M:%S')} · "
            + " · ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.meta.items() if v not in (None, "")))


def render_markdown(report: Report) -> str:
    lines = [f"# Report: {report.name}", "", _meta_line(report), ""]
    for title, text, md_table, images in report.sections:
        lines += [f"## {title}", ""]
        for block in (text, md_table):
            if block:
                lines += [block, ""]
        for img in images:
            lines += [f"![{img.stem}]({img.name})", ""]
    lines += ["## Findings (measured)", ""]
    lines += [f"- {f}" for f in report.findings] or ["- (none)"]
    return "\n".join(lines) + "\n"


def _cells(row: str) -> List[str]:
    """The cells of one Markdown table row (``\\|`` is a literal bar)."""
    parts, cur, esc = [], "", False
    for ch in row.strip()[1:-1]:
        if esc:
            cur, esc = cur + ch, False
        elif ch == "\\":
            esc = True
        elif ch == "|":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _md_table_to_html(md: str) -> str:
    rows = [r.strip() for r in md.strip().splitlines() if r.strip().startswith("|")]
    if len(rows) < 2:
        return f"<p>{html.escape(md)}</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    return html.escape(text).replace("**", "")


def render_html(report: Report) -> str:
    """One page with the PNGs embedded (base64), readable without the folder."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}</style></head><body>",
             f"<h1>Report: {html.escape(report.name)}</h1>", f"<p>{html.escape(_meta_line(report))}</p>"]
    for title, text, md_table, images in report.sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            parts.append(f"<p>{_inline(text)}</p>")
        if md_table:
            parts.append(_md_table_to_html(md_table))
        for img in images:
            data = base64.b64encode(img.read_bytes()).decode()
            parts.append(f"<p><a href='{html.escape(img.name)}'><img alt='{html.escape(img.stem)}' "
                         f"src='data:image/png;base64,{data}'></a></p>")
    parts.append("<h2>Findings (measured)</h2><ul>")
    parts += [f"<li>{_inline(f)}</li>" for f in report.findings]
    parts.append("</ul></body></html>")
    return "\n".join(parts)
