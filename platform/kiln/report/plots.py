"""The report's figures: each function draws one PNG with matplotlib's Agg canvas.

Figures are built with the object API (`matplotlib.figure.Figure` on a `FigureCanvasAgg`), so
drawing never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logging.getLogger("matplotlib").setLevel(logging.WARNING)

TRAIN_COLOR = "#2563eb"
VALIDATION_COLOR = "#dc2626"
BASELINE_COLOR = "#6b7280"
PALETTE = (
    "#2563eb",
    "#dc2626",
    "#16a34a",
    "#9333ea",
    "#ea580c",
    "#0891b2",
    "#db2777",
    "#65a30d",
    "#4f46e5",
    "#b45309",
)
DPI = 110
STYLE: Any = {  # matplotlib rcParams
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "legend.fontsize": 8,
}


def _styled(draw: Callable[..., Path]) -> Callable[..., Path]:
    """Draw under the report's matplotlib style, without changing the process-wide one."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        from matplotlib import rc_context

        with rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


@dataclass
class Series:
    """One line of a line chart."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    dashed: bool = False


@dataclass
class Panel:
    """One axes of a chart: lines, optional horizontal reference lines, labels."""

    title: str
    series: list[Series]
    xlabel: str = "epoch"
    ylabel: str = ""
    log_y: bool = False
    references: list[tuple[str, float]] = field(default_factory=list)


@_styled
def line_panels(path: Path, panels: list[Panel], *, title: str | None = None) -> Path:
    """Line charts side by side (at most three per row), e.g. train vs validation per epoch."""
    columns = 2 if len(panels) == 4 else min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    width = 7.5 if columns == 1 else max(7.5, 3.4 * columns)
    fig, axes = _figure(width, 3.4 if rows == 1 else 3.0 * rows, rows, columns)
    for ax, panel in zip(axes, panels, strict=False):
        _draw_panel(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontweight="bold")
    return _save(fig, path)


@_styled
def confusion_heatmap(path: Path, matrix: list[list[int]], labels: list[str]) -> Path:
    """Counts annotated on cells coloured by the share of each true class (row-normalised)."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = max(4.0, min(9.0, 0.32 * len(labels) + 3.0))
    fig, axes = _figure(size + 0.8, size, 1, 1)
    ax = axes[0]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.grid(False)
    ticks = range(len(labels))
    long = max(len(label) for label in labels) > 3
    ax.set_xticks(list(ticks), labels=labels, rotation=45 if long else 0)
    ax.set_yticks(list(ticks), labels=labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix")
    if len(labels) <= 30:
        for (row, col), count in np.ndenumerate(counts):
            colour = "white" if shares[row, col] > 0.55 else "#111827"
            ax.text(col, row, f"{int(count)}", ha="center", va="center", fontsize=7, color=colour)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class")
    return _save(fig, path)


@_styled
def residual_plot(path: Path, actual: Sequence[float], predicted: Sequence[float]) -> Path:
    """Predicted against actual (with the y = x line) and residuals against predicted."""
    fig, axes = _figure(10.0, 4.2, 1, 2)
    left, right = axes
    low = min(min(actual), min(predicted))
    high = max(max(actual), max(predicted))
    left.scatter(actual, predicted, s=8, alpha=0.5, color=TRAIN_COLOR, linewidths=0)
    left.plot([low, high], [low, high], color=BASELINE_COLOR, linestyle="--", label="y = x")
    left.set_xlabel("actual")
    left.set_ylabel("predicted")
    left.set_title("predicted vs actual")
    left.legend(loc="upper left")
    residuals = [p - a for a, p in zip(actual, predicted, strict=True)]
    right.scatter(predicted, residuals, s=8, alpha=0.5, color=VALIDATION_COLOR, linewidths=0)
    right.axhline(0.0, color=BASELINE_COLOR, linestyle="--")
    right.set_xlabel("predicted")
    right.set_ylabel("residual (predicted - actual)")
    right.set_title(f"residuals ({len(residuals)} validation rows)")
    return _save(fig, path)


@_styled
def params_scatter(
    path: Path,
    metric: str,
    params: list[tuple[str, list[Any], list[float], bool]],
) -> Path:
    """The metric of every trial against each searched parameter: (name, values, metric,
    log scale). Non-numeric values get one position per distinct value."""
    columns = min(3, len(params))
    rows = math.ceil(len(params) / columns)
    fig, axes = _figure(max(4.5, 3.8 * columns), 3.4 * rows, rows, columns)
    for ax, (name, values, scores, log) in zip(axes, params, strict=False):
        if all(isinstance(v, (int, float)) for v in values):
            ax.scatter(values, scores, color=TRAIN_COLOR, s=28, zorder=3)
            if log:
                ax.set_xscale("log")
        else:
            names = sorted({str(v) for v in values})
            ax.scatter([names.index(str(v)) for v in values], scores, color=TRAIN_COLOR, s=28)
            ax.set_xticks(range(len(names)), labels=names)
            ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    fig.suptitle(f"{metric} of every trial against each searched parameter", fontweight="bold")
    return _save(fig, path)


@_styled
def bar_chart(path: Path, title: str, labels: list[str], values: list[float]) -> Path:
    """Horizontal bars with their values written at the end."""
    fig, axes = _figure(7.5, 0.6 * len(labels) + 1.4, 1, 1)
    ax = axes[0]
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(labels))]
    bars = ax.barh(labels, values, color=colours)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.grid(axis="y", visible=False)
    ax.margins(x=0.15)
    return _save(fig, path)


def _draw_panel(ax: Any, panel: Panel) -> None:
    for index, series in enumerate(panel.series):
        ax.plot(
            series.x,
            series.y,
            marker="o" if len(series.x) <= 40 else None,
            markersize=3.5,
            linewidth=1.6,
            linestyle="--" if series.dashed else "-",
            color=series.color or PALETTE[index % len(PALETTE)],
            label=series.label,
        )
    for label, value in panel.references:
        ax.axhline(value, color=BASELINE_COLOR, linestyle=":", linewidth=1.4, label=label)
    if panel.log_y:
        ax.set_yscale("log")
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    xs = [x for series in panel.series for x in series.x]
    if xs and all(float(x).is_integer() for x in xs) and len(set(xs)) <= 20:
        ax.set_xticks(sorted(set(xs)))
    if len(panel.series) + len(panel.references) > 1:
        ax.legend(loc="best")


def _figure(width: float, height: float, rows: int, columns: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, squeeze=False).flatten().tolist()


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path
