"""Reading the Grafana dashboard under k8s/grafana: its panel and variable queries, and the
metric names a PromQL expression refers to (a small extractor, enough for dashboard queries)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "grafana" / "kiln-dashboard.json"

RAY_SERIES = frozenset(
    {
        "ray_serve_deployment_replica_healthy",
        "ray_serve_batch_queue_length",
        "ray_serve_deployment_queued_queries",
    }
)
"""Ray Serve's own series the dashboard may use besides kiln's catalog (docs/metrics.md)."""

KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "start", "end"}
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+),)?\s*(?P<label>\w+)\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric (series) names a PromQL expression selects.

    Identifiers used as a series (alone or before `{...}` / `[...]`) count; function names
    (followed by `(`), keywords, label names (inside `{}` and grouping clauses), strings,
    durations, numbers and Grafana variables (`$x`, `${x}`) do not.
    """
    text = _STRINGS.sub('""', expr)
    text = _VARIABLES.sub("1", text)
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        if re.fullmatch(r"(?i)0x[0-9a-f]+|[0-9.e+-]+", name):
            continue
        names.add(name)
    return names


def load() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """`(panel title, expr)` of every panel target."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """`(variable name, series selector)` of every query variable (`label_values(...)`)."""
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = _LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(f"variable {variable['name']}: not a label_values query: {text}")
        if match.group("expr"):
            found.append((variable["name"], match.group("expr")))
    return found


def dashboard_metric_names(dashboard: dict[str, Any] | None = None) -> set[str]:
    """Every metric name the dashboard's panels and variables query."""
    document = load() if dashboard is None else dashboard
    exprs = [expr for _, expr in panel_exprs(document) + variable_exprs(document)]
    return {name for expr in exprs for name in metric_names(expr)}
