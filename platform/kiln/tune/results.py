"""The trials of a sweep as a table: on screen, as CSV and Parquet, and as PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
EPOCHS_PNG = "metric_per_epoch.png"
PARAMS_PNG = "metric_vs_params.png"


def trial_rows(grid: Any, params: list[str], metric: str, mode: str, epochs: int) -> list[dict]:
    """One row per trial of a Tune ResultGrid: its config, status, epochs run and metric.

    Args:
        params: the swept dotted paths (columns, in order).
        epochs: the epochs a trial runs when nothing stops it (train.epochs of the trial spec).
    """
    rows = []
    for result in grid:
        reports = _history(result)
        history = epoch_history(reports)
        row: dict[str, Any] = {"trial": _trial_id(result)}
        config = result.config or {}  # None for a trial that never reported (time budget)
        row.update({path: config.get(path) for path in params})
        row.update(summarize(history, metric, mode, epochs, failed=result.error is not None))
        row["reports"] = len(reports)
        row["run_dir"] = reports[-1].get("trial_run_dir") if reports else None
        row["per_epoch"] = per_epoch(history, metric)
        rows.append(row)
    rows.sort(key=lambda row: row["trial"])
    return rows


def epoch_history(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per epoch, in epoch order, for the model a trial ended with.

    Tune's own per-trial log is not a reliable history: a PBT trial that clones another one is
    restarted with Tune's log copied back from storage, which lags the driver's copy by up to
    the sync period, so the trial's reports before the clone can vanish; a trial restarted from
    an earlier checkpoint reports some epochs twice. The trial's final Ray Train run holds the
    whole history of its model in its latest checkpoint (for a clone: the donor's epochs, then
    its own), so that is the base; the trial's reports from that run (its checkpoint paths, and
    epochs after the latest checkpoint) override it.
    """
    from kiln.tune.trial import checkpoint_states

    run_dir = reports[-1].get("trial_run_dir") if reports else None
    seen = max((int(r["epoch"]) for r in reports if r.get("epoch") is not None), default=0)
    by_epoch: dict[int, dict[str, Any]] = {}
    states = checkpoint_states(run_dir) if isinstance(run_dir, str) else []
    if states:
        # not past the last epoch Tune saw: a stopped trial's run may finish one more
        # before its abort lands
        for epoch in states[-1][1].get("history", []):
            if int(epoch["epoch"]) <= seen:
                by_epoch[int(epoch["epoch"])] = dict(epoch)
    for report in reports:  # oldest first: a re-reported epoch keeps its latest report
        if report.get("epoch") is None:
            continue
        epoch = int(report["epoch"])
        if report.get("trial_run_dir") == run_dir or epoch not in by_epoch:
            by_epoch[epoch] = report
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def per_epoch(history: list[dict[str, Any]], metric: str) -> list[Any]:
    """The metric at epochs 1..last (index i is epoch i+1), None for an epoch with no value."""
    values = {int(epoch["epoch"]): epoch.get(metric) for epoch in history}
    return [values.get(epoch) for epoch in range(1, max(values, default=0) + 1)]


def summarize(
    history: list[dict[str, Any]], metric: str, mode: str, epochs: int, *, failed: bool
) -> dict[str, Any]:
    """Status, epochs run and the best (and last) metric of one trial's per-epoch reports."""
    scored = [epoch for epoch in history if _number(epoch.get(metric))]
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda epoch: epoch[metric]) if scored else {}
    with_checkpoint = [e for e in scored if e.get("checkpoint_path")]
    best_saved = pick(with_checkpoint, key=lambda e: e[metric]) if with_checkpoint else {}
    run = max((int(epoch.get("epoch", 0)) for epoch in history), default=0)
    if failed:
        status = "error"
    elif run >= epochs:
        status = "completed"
    else:
        status = "stopped early"
    return {
        "status": status,
        "epochs": run,
        "reports": len(history),
        metric: best.get(metric),
        f"last_{metric}": scored[-1][metric] if scored else None,
        "best_epoch": best.get("epoch"),
        "checkpoint": best_saved.get("checkpoint_path"),
        "checkpoint_metric": best_saved.get(metric),
        "run_dir": history[-1].get("trial_run_dir") if history else None,
    }


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial whose best saved checkpoint scores best; None if no trial saved one."""
    saved = [row for row in rows if row["checkpoint"] and _number(row["checkpoint_metric"])]
    if not saved:
        return None
    pick = max if mode == "max" else min
    return pick(saved, key=lambda row: row["checkpoint_metric"])


def format_table(rows: list[dict[str, Any]], params: list[str], metric: str) -> str:
    """A fixed-width text table: trial, swept values, status, epochs, best and last metric."""
    header = ["trial", *params, "status", "epochs", metric, f"last_{metric}"]
    lines = [[_cell(row.get(col)) for col in header] for row in rows]
    widths = [max(len(col), *(len(line[i]) for line in lines)) for i, col in enumerate(header)]
    out = ["  ".join(col.ljust(w) for col, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def write_tables(rows: list[dict[str, Any]], directory: str) -> dict[str, str]:
    """results.csv and results.parquet under `directory` (a local path), written atomically.

    List values (e.g. a swept `model.hidden_sizes`) are stored as JSON text.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            values.append(_storable(row.get(key)))
    table = pa.table(columns)
    written = {}
    for name, write in (
        (RESULTS_CSV, lambda t, p: pacsv.write_csv(t, p)),
        (RESULTS_PARQUET, lambda t, p: pq.write_table(t, p)),
    ):
        path = os.path.join(directory, name)
        write(table, path + ".tmp")
        os.replace(path + ".tmp", path)
        written[name] = path
    return written


def write_plots(
    rows: list[dict[str, Any]], params: list[str], metric: str, directory: str, *, log_params=()
) -> dict[str, str]:
    """Two PNGs: the metric per epoch of every trial, and each trial's best metric against each
    swept parameter (log scale for loguniform dimensions)."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    epochs_png = os.path.join(directory, EPOCHS_PNG)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        values = [(i + 1, v) for i, v in enumerate(row["per_epoch"]) if _number(v)]
        if values:
            ax.plot(
                *zip(*values, strict=True), marker="o", label=f"{row['trial']} ({row['status']})"
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, every trial")
    ax.legend(fontsize=6, loc="best")
    _save(fig, epochs_png)

    params_png = os.path.join(directory, PARAMS_PNG)
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 4), squeeze=False)
    for ax, path in zip(axes[0], params, strict=True):
        _scatter(ax, rows, path, metric, log=path in log_params)
    fig.suptitle(f"best {metric} per trial against each swept parameter")
    _save(fig, params_png)
    return {EPOCHS_PNG: epochs_png, PARAMS_PNG: params_png}


def _scatter(ax: Any, rows: list[dict[str, Any]], path: str, metric: str, *, log: bool) -> None:
    points = [(row.get(path), row[metric]) for row in rows if _number(row.get(metric))]
    if points and all(_number(x) for x, _ in points):
        ax.scatter([x for x, _ in points], [y for _, y in points])
        if log:
            ax.set_xscale("log")
    elif points:  # categorical values: one position per distinct value
        labels = sorted({json.dumps(x) for x, _ in points})
        ax.scatter([labels.index(json.dumps(x)) for x, _ in points], [y for _, y in points])
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    ax.set_xlabel(path)
    ax.set_ylabel(metric)


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _history(result: Any) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    records: list[dict[str, Any]] = frame.to_dict("records")
    cleaned = [{k: _plain(v) for k, v in record.items()} for record in records]
    return sorted(cleaned, key=lambda epoch: epoch.get("training_iteration") or 0)


def _trial_id(result: Any) -> str:
    trial = (result.metrics or {}).get("trial_id")
    return str(trial) if trial else Path(result.path).name


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _storable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
