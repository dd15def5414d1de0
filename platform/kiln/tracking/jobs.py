"""What `kiln train`, `kiln tune` and `kiln score` record, so their own modules only open a
tracker, hand over the callbacks and say how the run ended.

A train run's id is kept in its run directory's `kiln_run.json` (a sweep's in
`kiln_sweep.json`), so `--resume` continues the same tracked run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from kiln import storage
from kiln.tracking.tracker import Tracker, model_tag, report_dir, spec_params

logger = logging.getLogger(__name__)

RUN_ID_KEY = "tracking_run_id"


def train_tracker(spec: Any, run_dir: str, *, run_file: str, kind: str = "train") -> Tracker:
    """Start (or, for a run directory that has one, continue) the tracked run of a training.

    Args:
        spec: the JobSpec being trained.
        run_dir: the Ray Train run directory.
        run_file: the JSON file in `run_dir` that keeps the tracked run's id.
        kind: `train`, or `retrain` for a warm-started fine-tune.
    """
    return Tracker.start(
        spec.tracking,
        experiment=spec.name,
        kind=kind,
        name=spec.name,
        params=spec_params(spec),
        tags=_run_tags(spec, run_dir),
        resume_id=_saved_id(run_dir, run_file),
    )


def train_callbacks(tracker: Tracker, run_dir: str) -> list[Any]:
    """The Ray Train callbacks that log each epoch live (none when tracking is off)."""
    if not tracker.enabled:
        return []
    from kiln.tracking.callbacks import EpochMetrics
    from kiln.tracking.tensorboard import event_dir

    assert tracker.uri is not None and tracker.run_id is not None
    tensorboard = event_dir(run_dir) if tracker.tensorboard else None
    return [EpochMetrics(tracker.uri, tracker.run_id, tensorboard)]


def remember(tracker: Tracker, run_dir: str, run_file: str) -> None:
    """Add the tracked run's id to `run_dir/run_file` (JSON), for `--resume`."""
    if not tracker.enabled:
        return
    fs, path = storage.open_location(run_dir, field="train.storage")
    location = storage.join(path, run_file)
    saved = json.loads(storage.read_bytes(fs, location)) if storage.exists(fs, location) else {}
    saved[RUN_ID_KEY] = tracker.run_id
    storage.write_bytes(fs, location, json.dumps(saved).encode())


def finish_training(
    tracker: Tracker,
    spec: Any,
    *,
    model: Any,
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    run_dir: str,
) -> None:
    """After registration: any epoch the live logging missed, the best checkpoint's train_*
    and val_* metrics (`best_<name>`), `kiln.model` = name:version, `kiln.metric` (the one that
    picked the checkpoint); then FINISHED and the report."""
    if not tracker.enabled:
        return
    tracker.fill_history(history)
    best = {f"best_{k}": v for k, v in metrics.items() if k.startswith(("val_", "train_"))}
    tracker.log_metrics(best)
    tracker.set_tags(
        {
            "kiln.model": model_tag(model),
            "kiln.best_epoch": metrics.get("epoch", 0),
            "kiln.metric": spec.metric,
        }
    )
    tracker.finish("FINISHED")
    tracker.write_report(report_dir(run_dir), registry=spec.registry)


def sweep_tracker(spec: Any, sweep_dir: str, *, run_file: str) -> Tracker:
    """The sweep's parent run (kind `tune`), continued by `kiln tune --resume`."""
    return Tracker.start(
        spec.tracking,
        experiment=spec.name,
        kind="tune",
        name=spec.name,
        params=spec_params(spec),
        tags=_run_tags(spec, sweep_dir),
        resume_id=_saved_id(sweep_dir, run_file),
    )


def trial_callbacks(tracker: Tracker, spec: Any) -> list[Any]:
    """The Tune callback that keeps one child run per trial (none when tracking is off)."""
    if not tracker.enabled:
        return []
    from kiln.tracking.callbacks import TrialRuns

    assert tracker.uri is not None and tracker.run_id is not None
    experiment = spec.tracking.experiment or spec.name
    return [TrialRuns(tracker.uri, tracker.run_id, experiment, tracker.tensorboard)]


def finish_sweep(
    tracker: Tracker,
    spec: Any,
    *,
    model: Any,
    best: Mapping[str, Any],
    metric: str,
    sweep_dir: str,
    num_trials: int,
) -> None:
    """Tag the best trial and the registered model on the sweep's run; FINISHED; the report."""
    if not tracker.enabled:
        return
    tracker.log_metrics({f"best_{metric}": best.get(metric), "trials": num_trials})
    tracker.set_tags(
        {
            "kiln.model": model_tag(model),
            "kiln.best_trial": best.get("trial", ""),
            "kiln.metric": metric,
        }
    )
    tracker.finish("FINISHED")
    tracker.write_report(report_dir(sweep_dir), registry=spec.registry)


def score_tracker(settings: Any, *, ref: str, output: str, params: Mapping[str, Any]) -> Tracker:
    """A scoring run (kind `score`, named after its output) in the experiment of the model's
    name."""
    model_name = ref.split("@", 1)[0].split(":", 1)[0]
    return Tracker.start(
        settings,
        experiment=model_name,
        kind="score",
        name=output,
        params={"model": ref, "output": output, **params},
        tags={"kiln.output": output},
    )


def finish_score(tracker: Tracker, summary: Any) -> None:
    """The summary's counts and rate as metrics, the exact model version as `kiln.model`."""
    if not tracker.enabled:
        return
    values = (
        asdict(summary)
        if is_dataclass(summary) and not isinstance(summary, type)
        else dict(summary)
    )
    tracker.log_metrics(values)
    tracker.set_tags({"kiln.model": values.get("model", ""), "kiln.output": values["output"]})
    tracker.finish("FINISHED")


def _run_tags(spec: Any, run_dir: str) -> dict[str, str]:
    from kiln.config import spec_hash

    return {"kiln.run_dir": run_dir, "kiln.spec_hash": spec_hash(spec), "kiln.task": spec.data.task}


def _saved_id(run_dir: str, run_file: str) -> str | None:
    try:
        fs, path = storage.open_location(run_dir, field="train.storage")
        location = storage.join(path, run_file)
        if not storage.exists(fs, location):
            return None
        saved = json.loads(storage.read_bytes(fs, location))
    except (OSError, ValueError):
        return None
    run_id = saved.get(RUN_ID_KEY) if isinstance(saved, dict) else None
    return str(run_id) if run_id else None
