"""`kiln tune`: plan the sweep, run its trials on Ray Tune, tabulate and plot them, and
register the best trial's checkpoint the way `kiln train` registers its own.

Layout of a sweep directory (under train.storage):
    sweep.yaml, kiln_sweep.json     the sweep spec and shared preprocessing (for --resume)
    <Tune's experiment state and trial folders>
    runs/<trial id>[-n]/            each trial's Ray Train run (a `kiln train` run directory)
    results.csv, results.parquet, metric_per_epoch.png, metric_vs_params.png
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import yaml

from kiln import storage
from kiln.cluster import SweepPlan, connect, local_resources, plan_sweep
from kiln.cluster.resources import TRIAL_DRIVER_CPUS
from kiln.config import JobSpec, dump_spec, spec_hash, validate_spec
from kiln.data.fitted import FittedPreprocessor, preprocessor_from_dict
from kiln.data.source import check_data
from kiln.errors import KilnError, TrainingError
from kiln.registry import ModelVersion, Registry
from kiln.tracking import jobs as tracked
from kiln.train import run as train_run
from kiln.train.export import register_checkpoint
from kiln.tune import results, space
from kiln.tune.progress import LiveTable
from kiln.tune.trial import KilnTrial, TrialSetup, checkpoint_states

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
SWEEP_RUN_FILE = "kiln_sweep.json"
# Paths whose value changes the prepared data (files, preprocessing, the hashed split).
_DATA_PATHS = ("data.", "train.seed")


@dataclass
class SweepOutcome:
    sweep_dir: str
    rows: list[dict[str, Any]]
    """One row per trial (see results.trial_rows)."""
    best: dict[str, Any]
    model: ModelVersion
    files: dict[str, str]
    """results.csv/.parquet and the PNG plots."""


def run(
    spec: JobSpec | None, *, resume: str | None = None, address: str | None = None
) -> SweepOutcome:
    """Run (or resume) the sweep in `spec.tune` and register the best trial.

    Args:
        spec: the validated job spec with a `tune` section (None when resuming).
        resume: a sweep directory of an interrupted `kiln tune`; finished trials are kept and
            unfinished ones continue from their latest checkpoint.
        address: a Ray cluster address; default RAY_ADDRESS or a local Ray.
    """
    if resume:
        spec, sweep_dir, saved = _load_sweep(resume)
    else:
        if spec is None or spec.tune is None:
            raise KilnError("tune: the job spec has no `tune` section to sweep")
        space.check_space(spec)
        name = f"{spec.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir, saved = storage.join(train_run._storage_root(spec), name), None
    assert spec.tune is not None
    check = check_data(spec.data)
    local = local_resources(address)
    if local is not None:  # refuse a plan this machine cannot hold before starting Ray
        plan_for_cluster(spec, *local)
    tracker = tracked.sweep_tracker(spec, sweep_dir, run_file=SWEEP_RUN_FILE)
    with tracker:  # the sweep's run ends FAILED/KILLED when anything below raises
        connect(address)
        train_run._check_storage(spec)  # trials checkpoint under train.storage from every node
        plan = sweep_plan(spec)
        logger.info("resources: %s", plan.describe())
        shared = None
        if not _sweeps_data(spec):
            shared = train_run.prepare(
                spec, plan.trial, check, run_dir=sweep_dir, preprocessor=saved
            )
        if not resume:
            _save_sweep(spec, sweep_dir, shared)
            tracked.remember(tracker, sweep_dir, SWEEP_RUN_FILE)
        setup = TrialSetup(spec, sweep_dir, plan.cluster_cpus, plan.cluster_gpus, shared)
        started = time.monotonic()
        callbacks = tracked.trial_callbacks(tracker, spec)
        tuner = _tuner(spec, setup, plan, sweep_dir, restore=bool(resume), callbacks=callbacks)
        outcome = _finish(spec, tuner.fit(), sweep_dir, elapsed_s=time.monotonic() - started)
        tracked.finish_sweep(
            tracker,
            spec,
            model=outcome.model,
            best=outcome.best,
            metric=space.sweep_metric(spec)[0],
            sweep_dir=sweep_dir,
            num_trials=len(outcome.rows),
        )
    return outcome


def sweep_plan(spec: JobSpec) -> SweepPlan:
    """The plan against the connected cluster; swept resource paths are planned at every
    endpoint, and the sweep runs as many trials at once as the most demanding one allows."""
    import ray

    assert spec.tune is not None
    resources = ray.cluster_resources()
    return plan_for_cluster(
        spec, float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    )


def plan_for_cluster(spec: JobSpec, cluster_cpus: float, cluster_gpus: float) -> SweepPlan:
    """plan_sweep for the base spec and each endpoint of swept train.* resource paths."""
    assert spec.tune is not None
    tune = spec.tune
    grid_points = 1
    for dim in tune.space.values():
        grid_points *= len(dim.values or []) if dim.sample == "grid" else 1
    candidates = [spec]
    for path, dim in tune.space.items():
        if path.split(".")[1] in ("num_workers", "resources_per_worker", "data_cpus", "use_gpu"):
            candidates += [space.trial_spec(spec, {path: v}) for v in space._endpoints(dim)]
    plans = [
        plan_sweep(
            candidate.train,
            num_trials=tune.num_samples * grid_points,
            max_concurrent_trials=tune.max_concurrent_trials,
            cluster_cpus=cluster_cpus,
            cluster_gpus=cluster_gpus,
        )
        for candidate in candidates
    ]
    return min(plans, key=lambda plan: plan.concurrent_trials)


def _tuner(
    spec: JobSpec,
    setup: TrialSetup,
    plan: SweepPlan,
    sweep_dir: str,
    *,
    restore: bool,
    callbacks: list[Any] | None = None,
):
    """The Tuner; `callbacks` join the live table (a restored sweep keeps the callbacks it
    was created with: Tune restores them from its saved state)."""
    from ray import tune

    assert spec.tune is not None
    metric, mode = space.sweep_metric(spec)
    trainable = tune.with_resources(
        tune.with_parameters(KilnTrial, setup=setup), {"CPU": TRIAL_DRIVER_CPUS}
    )
    if restore:
        logger.info("resuming sweep %s", sweep_dir)
        return tune.Tuner.restore(
            sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    params = list(spec.tune.space)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(spec),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=space.search_algorithm(spec, plan.concurrent_trials),
            scheduler=space.scheduler(spec),
            num_samples=spec.tune.num_samples,
            # the random generator limits itself (Tune warns and ignores this for it)
            max_concurrent_trials=plan.concurrent_trials if spec.tune.search != "random" else None,
            time_budget_s=spec.tune.time_budget_s,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.rstrip("/").rsplit("/", 1)[1],
            storage_path=sweep_dir.rstrip("/").rsplit("/", 1)[0],
            callbacks=[LiveTable(params, metric, mode), *(callbacks or [])],
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1),  # pointers: tiny
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _finish(spec: JobSpec, grid: Any, sweep_dir: str, *, elapsed_s: float) -> SweepOutcome:
    assert spec.tune is not None
    metric, mode = space.sweep_metric(spec)
    params = list(spec.tune.space)
    rows = results.trial_rows(grid, params, metric, mode, spec.train.epochs)
    budget = spec.tune.time_budget_s
    out_of_time = budget is not None and elapsed_s >= budget
    if out_of_time:
        logger.warning(
            "tune.time_budget_s=%g ran out after %.0f s: %d trial(s) completed",
            budget,
            elapsed_s,
            sum(row["status"] == "completed" for row in rows),
        )
    directory = _local_dir(sweep_dir)
    files = results.write_tables(rows, directory)
    log_params = [p for p, d in spec.tune.space.items() if d.sample == "loguniform"]
    files |= results.write_plots(rows, params, metric, directory, log_params=log_params)
    logger.info("trials:\n%s", results.format_table(rows, params, metric))
    best = results.best_row(rows, metric, mode)
    if best is None:
        errors = [str(r.error) for r in grid if r.error is not None][:1]
        raise TrainingError(
            f"no trial of the sweep saved a checkpoint with {metric!r}"
            + (
                f"; tune.time_budget_s={budget:g} ran out after {elapsed_s:.0f} s"
                if out_of_time
                else ""
            )
            + (f"; first error: {errors[0]}" if errors else "")
        )
    model = register_best(spec, best, sweep_dir, len(rows))
    return SweepOutcome(sweep_dir, rows, best, model, files)


def register_best(
    spec: JobSpec, best: dict[str, Any], sweep_dir: str, num_trials: int
) -> ModelVersion:
    """Register the best trial's best checkpoint with kiln's own registration; lineage adds
    the sweep (its directory, spec hash, search and scheduler) and the trial (id, values)."""
    from ray.train import Checkpoint

    assert spec.tune is not None
    trial_spec, run_dir, preprocessor = train_run._load_run(best["run_dir"])
    metric, mode = space.sweep_metric(spec)
    path, state = _best_checkpoint(run_dir, metric, mode)
    checkpoint = Checkpoint(path)
    history = list(state.get("history", []))
    metrics = next((e for e in history if e.get("epoch") == state["epoch"]), state)
    metrics = {k: v for k, v in metrics.items() if k != "history"}
    train_info, val_info = check_data(trial_spec.data)
    lineage = {
        "run_dir": run_dir,
        "checkpoint": path,
        "spec_hash": spec_hash(trial_spec),
        "data": {
            "train": train_info.files.fingerprint(),
            "validation": val_info.files.fingerprint() if val_info else None,
            "train_rows": _train_rows(run_dir),
        },
        "sweep": {
            "dir": sweep_dir,
            "spec_hash": spec_hash(spec),
            "trial": best["trial"],
            "params": {path: best.get(path) for path in spec.tune.space},
            "metric": metric,
            "search": spec.tune.search,
            "scheduler": spec.tune.scheduler.kind,
            "trials": num_trials,
        },
    }
    version = register_checkpoint(
        Registry(trial_spec.registry),
        trial_spec,
        checkpoint,
        preprocessor,
        metrics=metrics,
        history=history,
        lineage=lineage,
        profile=_training_profile(trial_spec, train_info),
    )
    logger.info("registered %s from trial %s", version.ref, best["trial"])
    return version


def _training_profile(trial_spec: JobSpec, train_info: Any) -> dict[str, Any] | None:
    """The drift profile of the best trial's training files (all of them: a
    `data.validation_split` holdout is not carved out here), streamed through Ray Data once the
    trials have released the cores. None for language models."""
    from kiln.data.source import read_dataset
    from kiln.monitor import profile_dataset

    if trial_spec.data.task == "language_modeling":
        return None
    remote = {"num_cpus": 0.5}
    raw = read_dataset(train_info.files, columns=list(train_info.features), ray_remote_args=remote)
    numeric, categorical = list(train_info.numeric), list(train_info.categorical)
    return profile_dataset(raw, numeric=numeric, categorical=categorical, num_cpus=0.5).to_dict()


def _best_checkpoint(run_dir: str, metric: str, mode: str) -> tuple[str, dict[str, Any]]:
    """The trial run's best kept checkpoint by `metric`, read from the checkpoints themselves
    (Ray Train deletes all but train.keep_checkpoints, so a reported path may be gone)."""
    found = [
        (path, state)
        for path, state in checkpoint_states(run_dir)
        if isinstance(state.get(metric), (int, float))
    ]
    if not found:
        raise TrainingError(f"{run_dir}: no checkpoint with {metric!r} left to register")
    pick = max if mode == "max" else min
    return pick(found, key=lambda item: (item[1][metric], item[1]["epoch"]))


def _train_rows(run_dir: str) -> int | None:
    fs, path = storage.open_location(run_dir, field="--resume")
    saved = json.loads(storage.read_bytes(fs, storage.join(path, train_run.RUN_FILE)))
    rows = saved.get("stats", {}).get("rows_used")
    return int(rows) if rows is not None else None


def _sweeps_data(spec: JobSpec) -> bool:
    assert spec.tune is not None
    return any(path.startswith(_DATA_PATHS) for path in spec.tune.space)


def _local_dir(sweep_dir: str) -> str:
    if storage.is_uri(sweep_dir) and not sweep_dir.startswith("file://"):
        local = os.path.abspath(
            os.path.join(".kiln", "sweeps", sweep_dir.rstrip("/").rsplit("/", 1)[1])
        )
        logger.info("sweep storage is remote; results and plots go to %s", local)
    else:
        local = sweep_dir.removeprefix("file://")
    os.makedirs(local, exist_ok=True)
    return local


def _save_sweep(spec: JobSpec, sweep_dir: str, shared: train_run.Prepared | None) -> None:
    fs, path = storage.open_location(sweep_dir, field="train.storage")
    fs.create_dir(path, recursive=True)
    storage.write_bytes(fs, storage.join(path, SWEEP_FILE), dump_spec(spec).encode())
    saved = {"preprocessing": shared.preprocessor.to_dict() if shared else None}
    storage.write_bytes(fs, storage.join(path, SWEEP_RUN_FILE), json.dumps(saved).encode())


def _load_sweep(sweep_dir: str) -> tuple[JobSpec, str, FittedPreprocessor | None]:
    location = sweep_dir if storage.is_uri(sweep_dir) else os.path.abspath(sweep_dir)
    fs, path = storage.open_location(location, field="--resume")
    spec_path, run_path = storage.join(path, SWEEP_FILE), storage.join(path, SWEEP_RUN_FILE)
    if not (storage.exists(fs, spec_path) and storage.exists(fs, run_path)):
        raise KilnError(
            f"--resume {sweep_dir}: not a kiln sweep directory (no {SWEEP_FILE}/{SWEEP_RUN_FILE})"
        )
    spec = validate_spec(yaml.safe_load(storage.read_bytes(fs, spec_path)), source=spec_path)
    saved = json.loads(storage.read_bytes(fs, run_path))["preprocessing"]
    return spec, location.rstrip("/"), preprocessor_from_dict(saved) if saved else None
