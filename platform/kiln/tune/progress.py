"""A live trial table in the log while a sweep runs (Tune's own reporter is turned off), and a
progress line of trials finished out of the sweep's total, with the ETA (see `kiln.progress`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

from kiln.progress import Progress
from kiln.tune.results import format_table

logger = logging.getLogger(__name__)


class LiveTable(Callback):
    """Logs the trial table when a trial finishes or fails, and at most every `every_s` seconds
    as epochs are reported; shows trials finished of the total while the sweep runs."""

    def __init__(self, params: list[str], metric: str, mode: str, every_s: float = 15.0) -> None:
        self._params, self._metric, self._mode, self._every_s = params, metric, mode, every_s
        self._rows: dict[str, dict[str, Any]] = {}
        self._last = 0.0
        self._finished: set[str] = set()
        self._progress: Progress | None = None

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        """Tune passes the number of trials the sweep will run (grid points included)."""
        total = total_num_samples or None  # 0 when unknown
        self._progress = Progress("tuning", total=total, unit="trials").start()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._progress is not None:
            self._count_finished(trials)
            self._progress.close()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="running")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._update(trial, status="running", result=result)
        if time.monotonic() - self._last >= self._every_s:
            self._print()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="finished")
        self._print()
        self._finished.add(trial.trial_id)
        self._count_finished(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="error")
        self._print()
        self._finished.add(trial.trial_id)
        self._count_finished(trials)

    def _count_finished(self, trials: list) -> None:
        """Trials done, this session's and those a resumed sweep had finished before."""
        earlier = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if self._progress is not None:
            self._progress.update(len(self._finished | earlier))

    def _update(self, trial: Any, *, status: str, result: dict | None = None) -> None:
        row = self._rows.setdefault(
            trial.trial_id,
            {"trial": trial.trial_id, **{p: trial.config.get(p) for p in self._params}},
        )
        row["status"] = status
        if result is not None:
            row["epochs"] = result.get("epoch")
            value = result.get(self._metric)
            row[f"last_{self._metric}"] = value
            best = row.get(self._metric)
            better = max if self._mode == "max" else min
            row[self._metric] = value if best is None else better(best, value)

    def _print(self) -> None:
        self._last = time.monotonic()
        rows = sorted(self._rows.values(), key=lambda row: row["trial"])
        logger.info("trials:\n%s", format_table(rows, self._params, self._metric))
