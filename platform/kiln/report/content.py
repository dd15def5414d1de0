"""What a report says about each kind of run: header facts, key figures, and sections of
figures, tables and notes. Drawing goes to `plots`; turning it into HTML to `html`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.report import plots
from kiln.report.plots import Panel, Series
from kiln.tracking.record import RunRecord

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "perplexity")
UNSET = ("", "None", "none", "null")
FINAL_FIGURES = (
    "val_loss",
    "train_loss",
    "val_r2",
    "val_mae",
    "val_perplexity",
    "val_unigram_perplexity",
)
"""Last values shown as key figures beside the best value of the ranking metric."""


@dataclass
class Figure:
    """A PNG of the report."""

    name: str
    title: str
    path: Path
    caption: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""
    caption: str = ""


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    side_by_side: bool = False
    """Figures and tables in two columns (a heatmap beside its table) on a wide page."""


@dataclass
class Report:
    """Everything the page shows, in order."""

    record: RunRecord
    title: str
    facts: list[tuple[str, str]]
    key_figures: list[tuple[str, str]]
    sections: list[Section]
    notes: list[str] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        return [figure for section in self.sections for figure in section.figures]

    @property
    def all_notes(self) -> list[str]:
        return self.notes + [note for section in self.sections for note in section.notes]


@dataclass
class Evaluation:
    """The registered model's evaluation.json, or why there is none."""

    document: dict[str, Any] | None
    source: str = ""
    missing: str = ""


def build(
    record: RunRecord,
    files: Path,
    *,
    children: list[RunRecord] | None,
    evaluation: Evaluation,
) -> Report:
    """Draw the figures of `record` into `files` and lay out the report.

    Args:
        children: the trials of a sweep (None: no tracking store to ask).
        evaluation: the registered model's evaluation document.
    """
    builders: dict[str, Callable[..., Report]] = {"tune": _tune_report, "score": _score_report}
    builder = builders.get(record.kind, _training_report)
    return builder(record, files, children=children, evaluation=evaluation)


# -- kinds of run ------------------------------------------------------------------------------


def _training_report(
    record: RunRecord, files: Path, *, children: Any, evaluation: Evaluation
) -> Report:
    sections = [
        _curves_section(record, files),
        _evaluation_section(record, files, evaluation),
        _throughput_section(record, files),
    ]
    return Report(
        record,
        _title(record),
        _facts(record),
        _training_figures(record),
        [s for s in sections if s is not None],
    )


def _tune_report(
    record: RunRecord, files: Path, *, children: list[RunRecord] | None, evaluation: Evaluation
) -> Report:
    metric, mode = metric_of(record)
    trials = _trials_section(record, files, children, metric, mode)
    key = [("trials", str(len(children)))] if children is not None else []
    best = _best_trial(children or [], metric, mode)
    source = record if _has_epochs(record) else best
    sections = [trials]
    if best is not None:
        key += [
            (f"best {metric}", f"{_fmt(_best_value(best, metric, mode))} ({_trial_name(best)})")
        ]
        finished = sum(1 for child in children or [] if child.status == "FINISHED")
        key.append(("finished trials", f"{finished} of {len(children or [])}"))
    if source is not None:
        label = "" if source is record else f" (best trial {_trial_name(source)})"
        curves = _curves_section(source, files)
        curves.title += label
        sections.append(curves)
        throughput = _throughput_section(source, files)
        if throughput is not None:
            throughput.title += label
            sections.append(throughput)
    evaluation_section = _evaluation_section(record, files, evaluation)
    if evaluation_section is not None:
        sections.insert(2, evaluation_section)
    return Report(record, _title(record), _facts(record), key, sections)


def _score_report(
    record: RunRecord, files: Path, *, children: Any, evaluation: Evaluation
) -> Report:
    counts = [(name, record.last(name)) for name in ("rows_in", "rows_out", "rows_quarantined")]
    present = [(name, value) for name, value in counts if value is not None]
    key = [(name.replace("_", " "), f"{value:,.0f}") for name, value in present]
    for name, label, unit in (("rows_per_s", "throughput", "rows/s"), ("seconds", "time", "s")):
        value = record.last(name)
        if value is not None:
            key.append((label, _fmt(value, unit)))
    section = Section("Scoring")
    if present:
        path = plots.bar_chart(
            files / "rows.png",
            "rows read, scored and quarantined",
            [name.replace("_", " ") for name, _ in present],
            [value for _, value in present],
        )
        section.figures.append(Figure("rows", "Rows", path))
    else:
        section.notes.append("The run logged no row counts (rows_in, rows_out, rows_quarantined).")
    section.tables.append(_last_values_table(record))
    sections = [section]
    throughput = _throughput_section(record, files)
    if throughput is not None:
        sections.append(throughput)
    return Report(record, _title(record), _facts(record), key, sections)


# -- sections ----------------------------------------------------------------------------------


def _curves_section(record: RunRecord, files: Path) -> Section:
    section = Section("Training curves")
    loss = [
        s
        for s in (
            _series(record, "train_loss", "train", plots.TRAIN_COLOR),
            _series(record, "val_loss", "validation", plots.VALIDATION_COLOR),
        )
        if s is not None
    ]
    if loss:
        path = plots.line_panels(files / "loss.png", [Panel("loss per epoch", loss, ylabel="loss")])
        section.figures.append(Figure("loss", "Loss", path, "train vs validation, per epoch"))
    else:
        section.notes.append("No per-epoch loss was logged (train_loss, val_loss).")
    panels = _metric_panels(record)
    if panels:
        path = plots.line_panels(files / "metrics.png", panels)
        caption = "validation metrics per epoch (train beside them where logged)"
        section.figures.append(Figure("metrics", "Metrics", path, caption))
    perplexity = _perplexity_panel(record)
    if perplexity is not None:
        path = plots.line_panels(files / "perplexity.png", [perplexity])
        caption = "the dotted line is a token-unigram model fitted on the training split"
        section.figures.append(Figure("perplexity", "Perplexity", path, caption))
    return section


def _metric_panels(record: RunRecord) -> list[Panel]:
    panels = []
    for name in sorted(record.metrics):
        if not name.startswith("val_") or name == "val_loss" or "perplexity" in name:
            continue
        base = name.removeprefix("val_")
        series = [
            _series(record, f"train_{base}", "train", plots.TRAIN_COLOR),
            _series(record, name, "validation", plots.VALIDATION_COLOR),
        ]
        lines = [s for s in series if s is not None]
        if lines and len(lines[-1].x) > 0:
            panels.append(Panel(base, lines, ylabel=base))
    return panels


def _perplexity_panel(record: RunRecord) -> Panel | None:
    lines = [
        s
        for s in (
            _series(record, "train_perplexity", "train", plots.TRAIN_COLOR),
            _series(record, "val_perplexity", "validation", plots.VALIDATION_COLOR),
        )
        if s is not None
    ]
    if not lines:
        return None
    baseline = record.last("val_unigram_perplexity")
    references = [("unigram baseline", float(baseline))] if baseline and _finite(baseline) else []
    values = [y for s in lines for y in s.y] + [value for _, value in references]
    spread = max(values) / max(min(values), 1e-9)
    return Panel(
        "perplexity per epoch", lines, ylabel="perplexity", log_y=spread > 20, references=references
    )


def _evaluation_section(record: RunRecord, files: Path, evaluation: Evaluation) -> Section | None:
    if task_of(record) == "language_modeling":
        return None  # the perplexity curves are the evaluation
    section = Section("Evaluation of the registered model")
    document = evaluation.document
    if document is None:
        section.notes.append(evaluation.missing or "No evaluation of a registered model.")
        return section
    where = f"{evaluation.source}, epoch {document.get('epoch', '?')} (the registered checkpoint)"
    if document.get("task") == "classification":
        _classification_evaluation(section, files, document, where)
    elif document.get("task") == "regression":
        _regression_evaluation(section, files, document, where)
    else:
        section.notes.append(f"{evaluation.source}: evaluation.json holds no known evaluation.")
    return section


def _classification_evaluation(
    section: Section, files: Path, document: dict[str, Any], where: str
) -> None:
    matrix = document.get("confusion_matrix") or []
    per_class = document.get("per_class") or []
    labels = [str(label) for label in document.get("labels") or range(len(matrix))]
    section.side_by_side = True  # the heatmap beside its table
    if matrix:
        path = plots.confusion_heatmap(files / "confusion_matrix.png", matrix, labels)
        caption = f"validation rows ({document.get('rows', '?')}) of {where}"
        section.figures.append(Figure("confusion_matrix", "Confusion matrix", path, caption))
    rows = [
        [label, *(f"{c[k]:.3f}" for k in ("precision", "recall", "f1")), str(c["support"])]
        for label, c in zip(labels, per_class, strict=False)
    ]
    present = [c for c in per_class if c["support"] > 0]
    if present:
        means = [sum(c[k] for c in present) / len(present) for k in ("precision", "recall", "f1")]
        support = sum(c["support"] for c in per_class)
        rows.append(["macro average", *(f"{m:.3f}" for m in means), str(support)])
    section.tables.append(
        Table(["class", "precision", "recall", "F1", "support"], rows, "Per-class scores", where)
    )


def _regression_evaluation(
    section: Section, files: Path, document: dict[str, Any], where: str
) -> None:
    sample = document.get("residual_sample") or {}
    actual, predicted = sample.get("actual") or [], sample.get("predicted") or []
    if actual:
        path = plots.residual_plot(files / "residuals.png", actual, predicted)
        rows = document.get("rows", "?")
        sampled = (
            f"all {rows} rows"
            if rows == len(actual)
            else f"a uniform sample of {len(actual)} of {rows} rows"
        )
        caption = f"{sampled}, {where}"
        section.figures.append(Figure("residuals", "Residuals", path, caption))
    else:
        section.notes.append(f"{where}: no residual sample was saved.")
    rows = [[k, _fmt(document[k])] for k in ("rows", "mse", "mae", "r2") if k in document]
    section.tables.append(Table(["validation", "value"], rows, "Errors", where))


def _throughput_section(record: RunRecord, files: Path) -> Section | None:
    panels = []
    for name, label in (
        ("samples_per_s", "samples/s"),
        ("tokens_per_s", "tokens/s"),
        ("rows_per_s", "rows/s"),
    ):
        series = _series(record, name, label, plots.TRAIN_COLOR)
        if name == "samples_per_s" and "tokens_per_s" in record.metrics:
            continue  # a language model's samples are blocks of tokens: tokens/s says it
        if series is not None and (record.kind != "score" or len(series.x) > 1):
            xlabel = "step" if record.kind == "score" else "epoch"
            panels.append(Panel(f"{label} per {xlabel}", [series], xlabel=xlabel, ylabel=label))
    lr = _series(record, "lr", "learning rate", plots.PALETTE[2])
    if panels and lr is not None:
        panels.append(Panel("learning rate at the end of each epoch", [lr], ylabel="lr"))
    if not panels:
        return None
    path = plots.line_panels(files / "throughput.png", panels)
    caption = "training throughput of the whole worker group, per epoch"
    return Section("Throughput", figures=[Figure("throughput", "Throughput", path, caption)])


def _trials_section(
    record: RunRecord,
    files: Path,
    children: list[RunRecord] | None,
    metric: str,
    mode: str,
) -> Section:
    section = Section("Trials")
    if children is None:
        section.notes.append("Trials not shown: the report was written without a tracking store.")
        return section
    if not children:
        section.notes.append("The sweep recorded no trials.")
        return section
    curves = [
        Series(_trial_name(child), *_xy(child.metrics.get(metric, [])))
        for child in children
        if child.metrics.get(metric)
    ]
    if curves:
        panel = Panel(f"{metric} per epoch, every trial", curves, ylabel=metric)
        path = plots.line_panels(files / "trials.png", [panel])
        section.figures.append(Figure("trials", "Trials", path, "one line per trial"))
    else:
        section.notes.append(f"No trial logged {metric!r} per epoch.")
    searched = searched_params(record, children)
    scores = [_best_value(child, metric, mode) for child in children]
    scored = [(c, s) for c, s in zip(children, scores, strict=True) if _finite(s)]
    if searched and scored:
        params = [
            (name, [_value(c.params.get(name)) for c, _ in scored], [s for _, s in scored], log)
            for name, log in searched.items()
        ]
        path = plots.params_scatter(files / "params.png", f"best {metric}", params)
        section.figures.append(Figure("params", "Searched parameters", path))
    elif not searched:
        section.notes.append("No parameter differs between the trials.")
    headers = ["trial", "status", "epochs", f"best {metric}", *searched]
    rows = [
        [_trial_name(c), c.status, str(len(c.metrics.get(metric, []))), _fmt(s)]
        + [c.params.get(name, "") for name in searched]
        for c, s in zip(children, scores, strict=True)
    ]
    section.tables.append(Table(headers, rows, "Every trial"))
    return section


# -- facts -------------------------------------------------------------------------------------


def _title(record: RunRecord) -> str:
    return f"{record.kind} run {record.name}"


def _facts(record: RunRecord) -> list[tuple[str, str]]:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.start_time))
    facts = [
        ("kind", record.kind),
        ("name", record.name),
        ("status", record.status),
        ("model", record.model or "none registered"),
        ("started", started),
        ("duration", _duration(record)),
        ("run id", record.run_id),
    ]
    if record.parent_run_id:
        facts.append(("sweep run", record.parent_run_id))
    return facts


def _training_figures(record: RunRecord) -> list[tuple[str, str]]:
    metric, mode = metric_of(record)
    history = record.metrics.get(metric) or []
    key = []
    if history:
        pick = min if mode == "min" else max
        epoch, value = pick(history, key=lambda point: point[1])
        key.append((f"best {metric}", f"{_fmt(value)} (epoch {epoch})"))
    for name in FINAL_FIGURES:
        if name != metric and record.last(name) is not None:
            key.append((f"final {name}", _fmt(record.last(name))))
    epochs = max((len(points) for points in record.metrics.values()), default=0)
    if epochs:
        key.append(("epochs", str(epochs)))
    for name, unit in (("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s")):
        values = [v for _, v in record.metrics.get(name, []) if _finite(v)]
        if values:
            key.append((f"mean {unit}", _fmt(sum(values) / len(values), "")))
            break
    return key + _retrain_figures(record, metric)


def _retrain_figures(record: RunRecord, metric: str) -> list[tuple[str, str]]:
    """kiln retrain: the gate's verdict and both versions' scores on the same holdout."""
    decision = record.tags.get("kiln.retrain.decision")
    if decision is None:
        return []
    old, new = record.last(f"holdout_old_{metric}"), record.last(f"holdout_new_{metric}")
    scores = f"old {_fmt(old)}, new {_fmt(new)}" if old is not None and new is not None else "?"
    source = record.tags.get("kiln.retrain.from", "?")
    return [(f"retrain from {source}", decision), (f"holdout {metric}", scores)]


def task_of(record: RunRecord) -> str:
    """classification, regression or language_modeling: from the spec, else the metrics."""
    task = record.params.get("data.task")
    if task and task not in UNSET:
        return task
    if "val_perplexity" in record.metrics:
        return "language_modeling"
    if "val_mse" in record.metrics or "val_r2" in record.metrics:
        return "regression"
    return "classification"


def metric_of(record: RunRecord) -> tuple[str, str]:
    """The metric that ranks checkpoints (or trials, for a sweep) and 'max' or 'min'."""
    keys = ("tune.metric", "train.metric") if record.kind == "tune" else ("train.metric",)
    metric = next((record.params[k] for k in keys if record.params.get(k, "") not in UNSET), "")
    metric = record.tags.get("kiln.metric", metric)
    if not metric:
        metric = "val_accuracy" if task_of(record) == "classification" else "val_loss"
    modes = ("tune.mode", "train.mode") if record.kind == "tune" else ("train.mode",)
    mode = next((record.params[k] for k in modes if record.params.get(k, "") in ("max", "min")), "")
    return metric, mode or ("min" if metric.endswith(LOWER_IS_BETTER) else "max")


def searched_params(record: RunRecord, children: list[RunRecord]) -> dict[str, bool]:
    """Spec paths whose value differs between trials -> whether to plot them on a log scale
    (a `loguniform` dimension, or positive numbers spanning more than two decades)."""
    keys = sorted({key for child in children for key in child.params})
    varying = {}
    for key in keys:
        values = [child.params.get(key) for child in children]
        space = any(p.startswith(f"tune.space.{key}.") for p in record.params)
        if key.startswith("tune.") or (len(set(values)) < 2 and not space):
            continue
        numbers = [_value(v) for v in values]
        positive = [v for v in numbers if isinstance(v, (int, float)) and v > 0]
        wide = len(positive) == len(numbers) and max(positive) / min(positive) > 100
        sampled = record.params.get(f"tune.space.{key}.sample", "")
        varying[key] = sampled == "loguniform" or wide
    return varying


# -- helpers -----------------------------------------------------------------------------------


def _series(record: RunRecord, name: str, label: str, color: str) -> Series | None:
    points = [(step, value) for step, value in record.metrics.get(name, []) if _finite(value)]
    if not points:
        return None
    return Series(label, *_xy(points), color=color)


def _xy(points: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
    kept = [(float(s), float(v)) for s, v in points if _finite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def _has_epochs(record: RunRecord) -> bool:
    return any(len(record.metrics.get(name, [])) > 0 for name in ("train_loss", "val_loss"))


def _best_value(record: RunRecord, metric: str, mode: str) -> float | None:
    values = [v for _, v in record.metrics.get(metric, []) if _finite(v)]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def _best_trial(children: list[RunRecord], metric: str, mode: str) -> RunRecord | None:
    scored = [(c, _best_value(c, metric, mode)) for c in children]
    ranked = [(c, v) for c, v in scored if v is not None]
    if not ranked:
        return None
    pick = min if mode == "min" else max
    return pick(ranked, key=lambda pair: pair[1])[0]


def _trial_name(record: RunRecord) -> str:
    return record.tags.get("kiln.trial_id") or record.name or record.run_id[:8]


def _last_values_table(record: RunRecord) -> Table:
    rows = [[name, _fmt(record.last(name))] for name in sorted(record.metrics)]
    return Table(["metric", "value"], rows, "Logged metrics (last values)")


def _duration(record: RunRecord) -> str:
    if record.end_time is None:
        if record.status != "RUNNING":
            return "unknown (no end time recorded)"
        return f"running ({_span(time.time() - record.start_time)} so far)"
    return _span(record.end_time - record.start_time)


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _value(text: str | None) -> Any:
    """A logged parameter string as a number when it is one."""
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text else number


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not _finite(value):
        return "n/a"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100 or float(value).is_integer():
        text = f"{value:.1f}" if not float(value).is_integer() else f"{value:.0f}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}".strip()
