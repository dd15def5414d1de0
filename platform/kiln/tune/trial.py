"""One Tune trial: the very TorchTrainer `kiln train` builds, with its reports forwarded to Tune.

Tune wraps Train: the trial is a Tune `Trainable` that fits the TorchTrainer in a thread, and a
Ray Train callback puts every per-epoch report (metrics and the checkpoint's path) on a queue;
each Tune step returns the next one, so ASHA can stop trials between epochs. When Tune stops a
trial (ASHA, PBT, the time budget), `cleanup` aborts the Train controller, which removes its
workers' placement group, so the next trial gets the CPUs.

The Tune checkpoint is a small pointer to the trial's own Ray Train checkpoint, never a copy:
- a trial restarted after the sweep driver died finds its pointer naming its own run and
  refits the same run, which Ray Train resumes from its latest checkpoint;
- a PBT trial handed another trial's pointer starts a new run of its own from that checkpoint,
  first copied beside the new run (`<run dir>.donor`): the donor trains on and Ray Train deletes
  all but its train.keep_checkpoints, so the checkpoint PBT picked may not outlive the clone's
  start-up. One already gone is replaced by the donor's next kept checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2.api.callback import UserCallback
from ray.tune import Trainable
from ray.util.queue import Empty, Full, Queue

from kiln import storage
from kiln.cluster import ResourcePlan, plan_sweep
from kiln.config import JobSpec
from kiln.data.source import DataInfo, check_data
from kiln.errors import TrainingError
from kiln.train import run as train_run
from kiln.train.loop import STATE_FILE
from kiln.train.run import checkpoint_states
from kiln.tune.space import trial_spec

logger = logging.getLogger(__name__)

POINTER_FILE = "kiln_trial.json"
RUNS_DIR = "runs"
DONOR_SUFFIX = ".donor"
_ABORT_TIMEOUT_S = 60.0


@dataclass
class TrialSetup:
    """What every trial shares, handed to the trial actors once through the object store."""

    spec: JobSpec
    """The sweep spec (with its tune section)."""
    sweep_dir: str
    cluster_cpus: float
    cluster_gpus: float
    prepared: train_run.Prepared | None
    """Datasets and preprocessing fitted once on the driver; None when the space sweeps data.*
    paths, so each trial prepares its own."""


class KilnTrial(Trainable):
    """Tune's trainable: `config` maps dotted spec paths to this trial's values."""

    def setup(self, config: dict[Any, Any], **params: Any) -> None:
        setup: TrialSetup = params["setup"]
        self._shared = setup
        self._spec = trial_spec(setup.spec, config)
        self._pointer: dict[str, Any] | None = None
        self._latest: dict[str, Any] | None = None
        self._reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self._controller: Any = None
        self._outcome: dict[str, BaseException] = {}
        self._fitting: threading.Thread | None = None
        self._done = False
        self._replay: list[dict[str, Any]] = []
        self._donor_copy: str | None = None

    def step(self) -> dict[str, Any]:
        """Wait for the next epoch's report; the last step says done."""
        if self._fitting is None:
            self._start()
        assert self._fitting is not None
        if self._replay:
            return self._result(self._replay.pop(0))
        while self._fitting.is_alive() or not self._reports.empty():
            try:
                item = self._reports.get(timeout=0.5)
            except Empty:
                continue
            if "metrics" not in item:  # the controller announcing itself
                self._controller = item["controller"]
                continue
            return self._result(item)
        if "error" in self._outcome:
            raise self._outcome["error"]
        # Ray Train returned with no report left: the run had finished (e.g. resumed after
        # its last epoch); repeat the latest metrics so Tune records the trial as done.
        latest = self._latest or (self._pointer or {}).get("metrics") or {}
        return {**latest, "done": True}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        pointer = self._pointer or {"run_dir": self._own_run_dir(), "checkpoint": None}
        Path(checkpoint_dir, POINTER_FILE).write_text(json.dumps(pointer))

    def load_checkpoint(self, checkpoint: Any) -> None:
        self._pointer = json.loads(Path(checkpoint, POINTER_FILE).read_text())

    def cleanup(self) -> None:
        """Abort a TorchTrainer still running (Tune stopped the trial), freeing its workers."""
        if self._fitting is not None and self._done:
            self._fitting.join(timeout=_ABORT_TIMEOUT_S)  # its last epoch is in: let it end
        if self._fitting is not None and self._fitting.is_alive() and not self._controller:
            self._controller = self._await_controller()  # stopped before its first report
        if self._fitting is not None and self._fitting.is_alive() and self._controller:
            logger.info("trial %s stopped: aborting its training run", self.trial_id)
            # the controller exits as part of aborting
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.get(self._controller.abort.remote(), timeout=_ABORT_TIMEOUT_S)
            self._fitting.join(timeout=_ABORT_TIMEOUT_S)
        self._reports.shutdown()

    def _await_controller(self) -> Any:
        """The run's controller handle from the queue (its announcement, or a report that
        Tune will not see now); None if the run ends or none comes within the abort timeout."""
        assert self._fitting is not None
        waited = 0.0
        while self._fitting.is_alive() and waited < _ABORT_TIMEOUT_S:
            try:
                item = self._reports.get(timeout=0.5)
            except Empty:
                waited += 0.5
                continue
            if item.get("controller") is not None:
                return item["controller"]
        return None

    def _own_run_dir(self) -> str:
        return storage.join(self._shared.sweep_dir, RUNS_DIR, self.trial_id)

    def _start(self) -> None:
        spec, setup = self._spec, self._shared
        plan = trial_plan(spec, setup)
        run_dir, resume_from = _run_dir(setup.sweep_dir, self.trial_id, self._pointer)
        prepared = setup.prepared or _prepare(spec, plan, run_dir)
        fs, path = storage.open_location(run_dir, field="train.storage")
        if not storage.exists(fs, storage.join(path, train_run.SPEC_FILE)):
            train_run._save_run(spec, run_dir, prepared)
        if resume_from is not None:
            assert self._pointer is not None
            resume_from = self._donor_copy = _pin_donor(self._pointer, run_dir)
            self._pointer = {"run_dir": run_dir, "checkpoint": None}  # a new run: nothing saved
        else:
            self._replay = _unreported_epochs(run_dir, self._pointer)
            # a clone restarted before its first checkpoint starts from the donor's copy again
            # (Ray Train prefers the run's own checkpoint when there is one)
            resume_from = self._donor_copy = _donor_copy(run_dir)
        if self._pointer is None:
            self._pointer = {"run_dir": run_dir, "checkpoint": None}
        self._fitting = threading.Thread(
            target=_fit,
            args=(spec, prepared, plan, run_dir, self._reports, resume_from, self._outcome),
            name=f"kiln-fit-{self.trial_id}",
            daemon=True,
        )
        self._fitting.start()

    def _result(self, item: dict[str, Any]) -> dict[str, Any]:
        assert self._pointer is not None
        self._controller = item["controller"] or self._controller
        metrics = {**item["metrics"], "trial_run_dir": self._pointer["run_dir"]}
        if item["checkpoint"] is not None:
            metrics["checkpoint_path"] = item["checkpoint"]
            if self._donor_copy is not None:  # the run resumes from its own checkpoints now
                _delete_dir(self._donor_copy)
                self._donor_copy = None
            self._pointer = {
                "run_dir": self._pointer["run_dir"],
                "checkpoint": item["checkpoint"],
                "metrics": item["metrics"],
            }
        # the last epoch ends the trial without waiting for Ray Train to wind down
        self._done = metrics.get("epoch", 0) >= self._spec.train.epochs
        self._latest = {**metrics, "done": self._done}
        return self._latest


def trial_plan(spec: JobSpec, setup: TrialSetup) -> ResourcePlan:
    """This trial's workers, sized by the same planner as the sweep (its spec may sweep
    train.num_workers or resources)."""
    return plan_sweep(
        spec.train,
        num_trials=1,
        max_concurrent_trials=None,
        cluster_cpus=setup.cluster_cpus,
        cluster_gpus=setup.cluster_gpus,
    ).trial


def _fit(
    spec: JobSpec,
    prepared: train_run.Prepared,
    plan: ResourcePlan,
    run_dir: str,
    reports: Any,
    resume_from: str | None,
    outcome: dict[str, BaseException],
) -> None:
    try:
        train_run.fit(
            spec,
            prepared,
            plan,
            run_dir,
            callbacks=[AnnounceController(reports), ForwardReports(reports)],
            resume_from=resume_from,
        )
    except BaseException as exc:  # handed to the step, which raises it to Tune
        outcome["error"] = exc


def _run_dir(
    sweep_dir: str, trial_id: str, pointer: dict[str, Any] | None
) -> tuple[str, str | None]:
    """This trial's Ray Train run directory, and a checkpoint to start from if it clones one.

    Returns:
        (run dir, checkpoint to start a fresh run from or None).
    """
    own = storage.join(sweep_dir, RUNS_DIR, trial_id)
    if pointer is None:
        return own, None
    if pointer["run_dir"] == own or pointer["run_dir"].startswith(own + "-"):
        return pointer["run_dir"], None  # restarted: Ray Train resumes the run itself
    fs, path = storage.open_location(own, field="train.storage")
    generation = 1
    while storage.exists(fs, f"{path}-{generation}"):
        generation += 1
    logger.info("trial %s starts from %s", trial_id, pointer["checkpoint"])
    return f"{own}-{generation}", pointer["checkpoint"]


def _pin_donor(pointer: dict[str, Any], run_dir: str) -> str:
    """Copy the donor's checkpoint to `<run_dir>.donor` for the clone's workers to load.

    The donor's run keeps training and deleting checkpoints beyond train.keep_checkpoints, so
    the one PBT picked may be gone (or go mid-copy); then the donor run's kept checkpoints from
    later epochs are tried, nearest first.

    Raises:
        TrainingError: none of the donor's checkpoints from that epoch on is left.
    """
    from pyarrow.fs import copy_files

    wanted = pointer.get("checkpoint")
    epoch = int((pointer.get("metrics") or {}).get("epoch", 0))
    later = [
        path for path, state in checkpoint_states(pointer["run_dir"]) if state["epoch"] > epoch
    ]
    target = run_dir.rstrip("/") + DONOR_SUFFIX
    fs, target_path = storage.open_location(target, field="train.storage")
    for source in [path for path in (wanted, *later) if path]:
        source_fs, source_path = storage.open_location(source, field="train.storage")
        _delete_dir(target)
        try:
            copy_files(
                source_path, target_path, source_filesystem=source_fs, destination_filesystem=fs
            )
        except OSError as exc:  # FileNotFoundError included: deleted before or while copying
            logger.info("donor checkpoint %s is gone (%s)", source, exc)
            continue
        if storage.exists(fs, storage.join(target_path, STATE_FILE)):
            if source != wanted:
                logger.warning(
                    "donor checkpoint %s was deleted by its run; the clone starts from %s",
                    wanted,
                    source,
                )
            return target
    raise TrainingError(
        f"PBT clone: the donor checkpoint {wanted} and every later one in {pointer['run_dir']} "
        "were deleted before the clone could copy them (raise train.keep_checkpoints)"
    )


def _donor_copy(run_dir: str) -> str | None:
    """`<run_dir>.donor` if a clone's copy of its donor checkpoint is still there."""
    target = run_dir.rstrip("/") + DONOR_SUFFIX
    fs, path = storage.open_location(target, field="train.storage")
    return target if storage.exists(fs, storage.join(path, STATE_FILE)) else None


def _delete_dir(location: str) -> None:
    fs, path = storage.open_location(location, field="train.storage")
    if storage.exists(fs, path):
        fs.delete_dir(path)


def _unreported_epochs(run_dir: str, pointer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Epochs the run finished that Tune has not seen: the sweep driver died after Ray Train
    reported them but before Tune saved its state. They are replayed to Tune, in order,
    before the run continues, so a resumed sweep keeps them."""
    states = checkpoint_states(run_dir)
    if not states:
        return []
    path, latest = states[-1]
    seen = int(((pointer or {}).get("metrics") or {}).get("epoch", 0))
    history = [epoch for epoch in latest.get("history", []) if int(epoch["epoch"]) > seen]
    return [
        {
            "metrics": epoch,
            "checkpoint": path if epoch["epoch"] == latest["epoch"] else None,
            "controller": None,
        }
        for epoch in history
    ]


def _prepare(spec: JobSpec, plan: ResourcePlan, run_dir: str) -> train_run.Prepared:
    """Check and prepare this trial's own data (its spec sweeps a data.* path)."""
    check: tuple[DataInfo, DataInfo | None] = check_data(spec.data)
    saved = None
    fs, path = storage.open_location(run_dir, field="train.storage")
    run_file = storage.join(path, train_run.RUN_FILE)
    if storage.exists(fs, run_file):  # restarted trial: keep the preprocessing it trained with
        from kiln.data.fitted import preprocessor_from_dict

        saved = preprocessor_from_dict(
            json.loads(storage.read_bytes(fs, run_file))["preprocessing"]
        )
    return train_run.prepare(spec, plan, check, run_dir=run_dir, preprocessor=saved)


class AnnounceController(ControllerCallback):
    """Puts the Train controller's handle on the trial's queue as soon as the run starts, so a
    trial Tune stops before its first report (the time budget, PBT) can still abort the run;
    otherwise that run trained on and kept its workers' CPUs. (Ray Train hands the controller
    the run's callbacks that are not `UserCallback`s unchanged, for work built on its own
    hooks.)"""

    def __init__(self, reports: Any) -> None:
        self._reports = reports

    def after_controller_start(self, train_run_context: Any) -> None:
        controller = ray.get_runtime_context().current_actor
        with contextlib.suppress(Full):  # best effort: the first report carries it too
            self._reports.put({"controller": controller}, timeout=30)


class ForwardReports(UserCallback):
    """A Ray Train callback (it runs in the Train controller) that puts each report on the
    trial's queue: rank 0's metrics, the persisted checkpoint's path and the controller (so a
    stopped trial can abort it)."""

    def __init__(self, reports: Any) -> None:
        self._reports = reports

    def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
        controller = ray.get_runtime_context().current_actor
        self._reports.put(
            {
                "metrics": dict(metrics[0]),
                "checkpoint": checkpoint.path if checkpoint is not None else None,
                "controller": controller,
            }
        )
