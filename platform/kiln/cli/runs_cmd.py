"""`kiln runs list|show`: the tracked train, tune, trial and score runs."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

URI_HELP = (
    "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./.kiln/mlflow.db, "
    "the store kiln train/tune/score write by default)"
)
# The metric shown in `runs list` per kind: the first one the run has.
_KEY_METRICS = (
    "best_val_accuracy",
    "best_val_loss",
    "best_val_perplexity",
    "best_val_r2",
    "val_accuracy",
    "val_loss",
    "val_perplexity",
    "rows_per_s",
)


def add_commands(commands: Any) -> None:
    """Register `kiln runs` on the top-level subparsers."""
    runs = commands.add_parser(
        "runs",
        help="list and show tracked runs (train, tune, trial, score)",
        description="Every kiln train, tune (with one trial run per trial) and score run is "
        "recorded in an MLflow tracking store: its spec as params, per-epoch metrics, status, "
        "the registered model and its artefacts.",
    )
    actions = runs.add_subparsers(title="actions", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="recent runs, newest first")
    listing.add_argument(
        "--kind", choices=["train", "tune", "trial", "score", "retrain"], help="only this kind"
    )
    listing.add_argument("--name", help="only runs of this job name (score: the output)")
    listing.add_argument("--limit", type=int, default=50, help="most runs shown (default: 50)")
    _common(listing)
    listing.set_defaults(handler=_list)

    show = actions.add_parser(
        "show",
        help="one run: status, params, metrics per epoch, tags, artefacts, trials",
    )
    show.add_argument("run_id", metavar="RUN_ID", help="a run id or a unique prefix of one")
    _common(show)
    show.set_defaults(handler=_show)


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    """--tracking-uri and --no-tracking for commands that record a run."""
    parser.add_argument("--tracking-uri", help=URI_HELP)
    parser.add_argument(
        "--no-tracking", action="store_true", help="do not record this run in the tracking store"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=URI_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _list(args: argparse.Namespace) -> int:
    from kiln.cli.main import print_json
    from kiln.errors import KilnError
    from kiln.tracking import open_store

    if args.limit < 1:
        raise KilnError(f"--limit: must be at least 1, got {args.limit}")
    records = open_store(args.tracking_uri).list(kind=args.kind, name=args.name, limit=args.limit)
    if args.json:
        print_json([_summary(record) for record in records])
        return 0
    if not records:
        print("no runs")
        return 0
    rows = [
        [
            record.run_id[:8],
            record.kind,
            record.name,
            record.status,
            _time(record.start_time),
            _duration(record),
            _key_metric(record),
            record.model or "",
        ]
        for record in records
    ]
    header = ["id", "kind", "name", "status", "started", "duration", "metric", "model"]
    print(_table(header, rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    from kiln.cli.main import print_json
    from kiln.tracking import open_store

    store = open_store(args.tracking_uri)
    record = store.get(args.run_id)
    children = store.children(record.run_id) if record.kind == "tune" else []
    files = _artifact_files(record.artifact_dir)
    if args.json:
        print_json(
            {
                **_summary(record),
                "params": record.params,
                "tags": record.tags,
                "metrics": {k: [list(p) for p in v] for k, v in record.metrics.items()},
                "artifact_dir": record.artifact_dir,
                "artifacts": files,
                "children": [_summary(child) for child in children],
            }
        )
        return 0
    print(f"run {record.run_id}  {record.kind} {record.name}  {record.status}")
    print(f"started {_time(record.start_time)}, duration {_duration(record)}")
    if record.model:
        print(f"model: {record.model}")
    if "kiln.error" in record.tags:
        print(f"error: {record.tags['kiln.error']}")
    _print_metrics(record)
    _print_mapping("tags", record.tags)
    _print_mapping("params", record.params)
    if files:
        print(f"artefacts ({record.artifact_dir}):")
        print("\n".join(f"  {name}" for name in files))
    if children:
        print(f"trials ({len(children)}):")
        rows = [
            [c.run_id[:8], c.name, c.status, _key_metric(c), _epochs(c), _trial_values(c)]
            for c in children
        ]
        print(_table(["id", "trial", "status", "metric", "epochs", "values"], rows, indent=2))
    return 0


def _print_metrics(record: Any) -> None:
    """One-off values on a line each, then the per-epoch table (a row per epoch)."""
    per_epoch = {k: v for k, v in record.metrics.items() if any(step > 0 for step, _ in v)}
    single = {k: v[-1][1] for k, v in record.metrics.items() if k not in per_epoch}
    if single:
        print("metrics:")
        for key, value in single.items():
            print(f"  {key}: {_number(value)}")
    if per_epoch:
        names = sorted(per_epoch)
        epochs = sorted({step for history in per_epoch.values() for step, _ in history})
        values = {name: dict(per_epoch[name]) for name in names}
        rows = [
            [str(epoch), *[_number(values[name].get(epoch)) for name in names]] for epoch in epochs
        ]
        print("per epoch:")
        print(_table(["epoch", *names], rows, indent=2))


def _print_mapping(title: str, mapping: dict[str, str]) -> None:
    if not mapping:
        return
    print(f"{title}:")
    for key in sorted(mapping):
        print(f"  {key}: {mapping[key]}")


def _summary(record: Any) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "kind": record.kind,
        "name": record.name,
        "status": record.status,
        "start_time": record.start_time,
        "end_time": record.end_time,
        "model": record.model,
        "parent_run_id": record.parent_run_id,
        "last_metrics": {k: v[-1][1] for k, v in record.metrics.items() if v},
    }


def _key_metric(record: Any) -> str:
    """The run's own ranking metric (`kiln.metric`: best value, else last), else the first of
    _KEY_METRICS it has."""
    ranked = record.tags.get("kiln.metric")
    names = (f"best_{ranked}", ranked) if ranked else ()
    for name in (*names, *_KEY_METRICS):
        value = record.last(name)
        if value is not None:
            return f"{name}={_number(value)}"
    return ""


def _epochs(record: Any) -> str:
    steps = {step for history in record.metrics.values() for step, _ in history if step > 0}
    return str(max(steps)) if steps else ""


def _trial_values(record: Any) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(record.params.items()))


def _artifact_files(directory: str | None) -> list[str]:
    from pathlib import Path

    if not directory or not Path(directory).is_dir():
        return []
    root = Path(directory)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _time(seconds: float | None) -> str:
    if not seconds:
        return ""
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _duration(record: Any) -> str:
    if record.end_time is None:
        return "running" if record.status == "RUNNING" else ""
    seconds = max(0.0, record.end_time - record.start_time)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]], indent: int = 0) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    pad = " " * indent
    lines = [
        pad
        + "  ".join(
            str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
