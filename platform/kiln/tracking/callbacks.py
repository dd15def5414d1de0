"""Live per-epoch tracking: a Ray Train callback for `kiln train` and a Tune callback that
keeps one child run per trial of `kiln tune`.

Both run on the driver's node: Ray Train V2 pins its controller (where `after_report` runs)
to the driver's node, and Tune callbacks run in the driver itself. Workers never write.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from kiln.tracking.store import Store, numeric_metrics
from kiln.tracking.tensorboard import ScalarWriter, event_dir

logger = logging.getLogger(__name__)

TRIAL_TAG = "kiln.trial_id"
# What Tune adds to every result: bookkeeping, not the trial's metrics.
_TUNE_KEYS = frozenset(
    {
        "training_iteration",
        "time_this_iter_s",
        "time_total_s",
        "time_since_restore",
        "iterations_since_restore",
        "timestamp",
        "timesteps_total",
        "timesteps_since_restore",
        "episodes_total",
        "pid",
        "done",
    }
)


class EpochMetrics(UserCallback):
    """Logs rank 0's report of every epoch to the run (step = epoch) as Ray Train receives it,
    and to TensorBoard when asked. A write that fails warns; training goes on."""

    def __init__(self, uri: str, run_id: str, tensorboard_dir: str | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._store: Store | None = None
        self._tensorboard = ScalarWriter(tensorboard_dir) if tensorboard_dir else None

    def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
        reported = dict(metrics[0]) if metrics else {}
        step = int(reported.get("epoch", 0))
        try:
            if self._store is None:
                self._store = Store(self.uri)
            self._store.log_metrics(self.run_id, reported, step)
            if self._tensorboard is not None:
                self._tensorboard.write(reported, step)
        except Exception as exc:
            logger.warning("tracking: epoch %d not recorded for run %s: %s", step, self.run_id, exc)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}


class TrialRuns(Callback):
    """One child run per trial under the sweep's run: the trial's values as params, its epochs
    as metrics, FINISHED/FAILED when it ends. A trial seen again after `kiln tune --resume`
    continues its earlier run."""

    def __init__(self, uri: str, parent_id: str, experiment: str, tensorboard: bool) -> None:
        self.uri, self.parent_id, self.experiment = uri, parent_id, experiment
        self.tensorboard = tensorboard
        self.runs: dict[str, str] = {}
        self._store: Store | None = None
        self._writers: dict[str, ScalarWriter] = {}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.uri)
        return self._store

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guarded(trial, "start", lambda: self._run_of(trial))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        def write() -> None:
            run_id = self._run_of(trial)
            metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS}
            step = int(metrics.get("epoch", 0))
            self.store.log_metrics(run_id, metrics, step)
            run_dir = result.get("trial_run_dir")
            if run_dir:
                self.store.set_tags(run_id, {"kiln.run_dir": run_dir})
                if self.tensorboard:
                    writer = self._writers.setdefault(
                        trial.trial_id, ScalarWriter(event_dir(str(run_dir)))
                    )
                    writer.write(numeric_metrics(metrics), step)

        self._guarded(trial, "result", write)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial: Any, status: str) -> None:
        writer = self._writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()
        self._guarded(trial, "end", lambda: self.store.end_run(self._run_of(trial), status))

    def _run_of(self, trial: Any) -> str:
        """The trial's run: known, found in the store (a resumed sweep), or created."""
        trial_id = trial.trial_id
        if trial_id in self.runs:
            return self.runs[trial_id]
        found = self.store.find({"kiln.parent_run_id": self.parent_id, TRIAL_TAG: trial_id})
        if found is not None:
            self.store.reopen(found.run_id)
            run_id = found.run_id
        else:
            params = {key: value for key, value in trial.config.items()}
            run_id = self.store.create_run(
                experiment=self.experiment,
                kind="trial",
                name=trial_id,
                params=params,
                tags={TRIAL_TAG: trial_id},
                parent=self.parent_id,
            )
        self.runs[trial_id] = run_id
        return run_id

    def _guarded(self, trial: Any, what: str, write: Any) -> None:
        try:
            write()
        except Exception as exc:
            logger.warning("tracking: trial %s %s not recorded: %s", trial.trial_id, what, exc)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_writers": {}}
