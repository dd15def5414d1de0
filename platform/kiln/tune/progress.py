"""A live trial table in the log while a sweep runs (Tune's own reporter is turned off)."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

from kiln.tune.results import format_table

logger = logging.getLogger(__name__)


class LiveTable(Callback):
    """Logs the trial table when a trial finishes or fails, and at most every `every_s` seconds
    as epochs are reported."""

    def __init__(self, params: list[str], metric: str, mode: str, every_s: float = 15.0) -> None:
        self._params, self._metric, self._mode, self._every_s = params, metric, mode, every_s
        self._rows: dict[str, dict[str, Any]] = {}
        self._last = 0.0

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

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="error")
        self._print()

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
