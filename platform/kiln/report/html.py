"""Render a Report as one self-contained HTML page: inline CSS, images as base64 data URIs,
no scripts and nothing fetched, so the file reads the same when mailed or archived."""

from __future__ import annotations

import base64
import html
import time

from kiln.report.content import Figure, Report, Section, Table

CSS = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --panel: #f9fafb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
  sans-serif; color: var(--ink); background: #f3f4f6; }
main { max-width: 1120px; margin: 0 auto; padding: 24px; }
header.run { background: #111827; color: #f9fafb; border-radius: 10px; padding: 20px 24px; }
header.run h1 { margin: 0 0 12px; font-size: 22px; }
header.run dl { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr));
  gap: 6px 18px; margin: 0; }
header.run dt { font-size: 11px; text-transform: uppercase; letter-spacing: .05em;
  color: #9ca3af; }
header.run dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
.status { display: inline-block; padding: 0 8px; border-radius: 999px; font-size: 12px; }
.status-FINISHED { background: #16a34a; } .status-FAILED { background: #dc2626; }
.status-RUNNING { background: #2563eb; } .status-KILLED { background: #ea580c; }
.keys { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px;
  margin: 18px 0; }
.key { background: white; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.key .label { color: var(--muted); font-size: 12px; }
.key .value { font-size: 18px; font-weight: 700; }
section { background: white; border: 1px solid var(--line); border-radius: 10px; padding: 16px 20px;
  margin: 18px 0; }
section h2 { margin: 0 0 12px; font-size: 17px; }
figure { margin: 0 0 16px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
  border-radius: 6px; }
.side { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
.side > div:first-child { flex: 1 1 560px; max-width: 680px; }
.side > div:last-child { flex: 1 1 300px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13px; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: var(--panel); font-weight: 600; }
tbody tr:last-child td { border-bottom: none; }
h3 { font-size: 14px; margin: 12px 0 4px; }
.caption { color: var(--muted); font-size: 12px; }
.note { background: #fffbeb; border-left: 4px solid #f59e0b; padding: 8px 12px; margin: 8px 0;
  border-radius: 4px; }
details { margin: 18px 0; background: white; border: 1px solid var(--line); border-radius: 10px;
  padding: 10px 20px; }
summary { cursor: pointer; font-weight: 600; }
details td { text-align: left; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  font-size: 12px; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin: 24px 0; }
"""


def render(report: Report) -> str:
    """The page for `report` (its figures must exist on disk)."""
    record = report.record
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>kiln report: {_e(report.title)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        _header(report),
        _key_figures(report.key_figures),
        *(_note(note) for note in report.notes),
        *(_section(section) for section in report.sections),
        _details("Spec parameters", record.params),
        _details("Tags", record.tags),
        f"<footer>kiln report, written {_e(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}"
        "</footer>",
        "</main></body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _header(report: Report) -> str:
    items = []
    for label, value in report.facts:
        shown = _e(value)
        if label == "status":
            shown = f'<span class="status status-{_e(value)}">{shown}</span>'
        items.append(f"<div><dt>{_e(label)}</dt><dd>{shown}</dd></div>")
    return f'<header class="run"><h1>{_e(report.title)}</h1><dl>{"".join(items)}</dl></header>'


def _key_figures(figures: list[tuple[str, str]]) -> str:
    if not figures:
        return ""
    cards = "".join(
        f'<div class="key"><div class="label">{_e(label)}</div>'
        f'<div class="value">{_e(value)}</div></div>'
        for label, value in figures
    )
    return f'<div class="keys">{cards}</div>'


def _section(section: Section) -> str:
    body = [f"<h2>{_e(section.title)}</h2>"]
    body += [_note(note) for note in section.notes]
    figures = "".join(_figure(figure) for figure in section.figures)
    tables = "".join(_table(table) for table in section.tables)
    if section.side_by_side and figures and tables:
        body.append(f'<div class="side"><div>{figures}</div><div>{tables}</div></div>')
    else:
        body += [figures, tables]
    return f"<section>{''.join(body)}</section>"


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    caption = f"<figcaption>{_e(figure.caption)}</figcaption>" if figure.caption else ""
    return (
        f'<figure id="figure-{_e(figure.name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{_e(figure.title)}" data-figure="{_e(figure.name)}">{caption}</figure>'
    )


def _table(table: Table) -> str:
    title = f"<h3>{_e(table.title)}</h3>" if table.title else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in table.rows
    )
    caption = f'<div class="caption">{_e(table.caption)}</div>' if table.caption else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{caption}"


def _details(title: str, values: dict[str, str]) -> str:
    if not values:
        return ""
    rows = [[key, values[key]] for key in sorted(values)]
    table = _table(Table(["key", "value"], rows))
    return f"<details><summary>{_e(title)} ({len(values)})</summary>{table}</details>"


def _note(text: str) -> str:
    return f'<div class="note">{_e(text)}</div>'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
