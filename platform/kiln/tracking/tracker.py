"""One tracked run as the driver writes it: started with the spec as params, metrics as they
come, the registered model as a tag, a final status whatever happens, and the report.

Tracking serves the run, never the reverse: once a run has started, a write the store refuses
is logged as a warning and training carries on. Only opening the store (a bad
`tracking.uri`) fails, before any work starts.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kiln.errors import KilnError
from kiln.tracking.record import RunRecord
from kiln.tracking.store import MODEL_TAG, Store, flatten, open_store

logger = logging.getLogger(__name__)

REPORT_DIR = "report"


class Tracker:
    """A run in the tracking store, or nothing at all when tracking is off (`Tracker.off()`):
    every method is then a no-op, so callers need no `if`.

    Used as a context manager, the run ends FAILED when the block raises, KILLED on Ctrl-C,
    and FINISHED otherwise (unless `finish` ended it already).
    """

    def __init__(
        self,
        store: Store | None,
        run_id: str | None,
        *,
        tensorboard: bool = False,
        report: bool = False,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.tensorboard = tensorboard
        self.report = report
        self._ended = False

    @classmethod
    def off(cls) -> Tracker:
        return cls(None, None)

    @classmethod
    def start(
        cls,
        settings: Any,
        *,
        experiment: str,
        kind: str,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent: str | None = None,
        resume_id: str | None = None,
    ) -> Tracker:
        """Start a run (or reopen `resume_id`, when the store still has it).

        Args:
            settings: the spec's `tracking` section (a TrackingSpec).
            experiment: the experiment name unless `settings.experiment` names one.

        Raises:
            KilnError: the store cannot be opened or written (the URI names it).
        """
        if not settings.enabled:
            return cls.off()
        store = open_store(settings.uri)
        options = {"tensorboard": settings.tensorboard, "report": settings.report}
        try:
            if resume_id and store.reopen(resume_id):
                logger.info("tracking: continuing run %s in %s", resume_id, store.uri)
                return cls(store, resume_id, **options)
            if resume_id:
                logger.warning(
                    "tracking: run %s is not in %s; starting a new one", resume_id, store.uri
                )
            run_id = store.create_run(
                experiment=settings.experiment or experiment,
                kind=kind,
                name=name,
                params=params,
                tags={k: str(v) for k, v in (tags or {}).items()},
                parent=parent,
            )
        except KilnError:
            raise
        except Exception as exc:
            raise KilnError(f"tracking.uri {store.uri}: cannot record the run: {exc}") from exc
        logger.info("tracking: %s run %s in %s", kind, run_id, store.uri)
        return cls(store, run_id, **options)

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.run_id is not None

    @property
    def uri(self) -> str | None:
        return self.store.uri if self.store is not None else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        self._safely("log metrics", lambda s, r: s.log_metrics(r, metrics, step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._safely("log params", lambda s, r: s.log_params(r, params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._safely("set tags", lambda s, r: s.set_tags(r, tags))

    def log_artifacts(self, local_dir: str | Path) -> None:
        self._safely("log artefacts", lambda s, r: s.log_artifacts(r, local_dir))

    def record(self) -> RunRecord | None:
        """The run as the store has it now (None when off or unreadable)."""
        if not self.enabled:
            return None
        assert self.store is not None and self.run_id is not None
        try:
            return self.store.get(self.run_id)
        except Exception as exc:
            logger.warning("tracking: cannot read run %s back: %s", self.run_id, exc)
            return None

    def fill_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Log the epochs of `history` (per-epoch metric dicts with `epoch`) the store lacks:
        the live per-epoch logging may have missed some (a write refused, a restart)."""
        record = self.record()
        if record is None:
            return
        for epoch in history:
            step = int(epoch.get("epoch", 0))
            missing = {
                key: value
                for key, value in epoch.items()
                if step not in {s for s, _ in record.metrics.get(key, [])}
            }
            self.log_metrics(missing, step)

    def finish(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        self._ended = True
        self._safely("end the run", lambda s, r: s.end_run(r, status))

    def write_report(self, out_dir: str, *, registry: str | None) -> Path | None:
        """The HTML report of this (finished) run into `out_dir`, logged as artefacts.

        Never raises: a report that cannot be made is a warning, the run stays as it is.
        """
        if not (self.enabled and self.report):
            return None
        try:
            # the report package is optional at import time: a missing one only warns
            write_report = importlib.import_module("kiln.report").write_report
            record = self.record()
            if record is None:
                return None
            page = Path(write_report(record, out_dir, store=self.store, registry=registry))
        except Exception as exc:  # the run is done and registered: a report must not undo it
            logger.warning("report: not written (%s: %s)", type(exc).__name__, exc)
            return None
        self.log_artifacts(page.parent)
        logger.info("report: %s", page)
        return page

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.finish("FINISHED")
        else:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """End the run KILLED (Ctrl-C, exit) or FAILED with the error as `kiln.error`."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self.finish("KILLED")
            return
        self.set_tags({"kiln.error": f"{type(exc).__name__}: {exc}"[:5000]})
        self.finish("FAILED")

    def _safely(self, what: str, write: Any) -> None:
        if not self.enabled:
            return
        try:
            write(self.store, self.run_id)
        except Exception as exc:
            logger.warning("tracking: could not %s for run %s: %s", what, self.run_id, exc)


def spec_params(spec: Any) -> dict[str, str]:
    """The job spec as MLflow params: every field (defaults included) under its dotted path."""
    return flatten(spec.model_dump(mode="json"))


def model_tag(version: Any) -> str:
    """`name:version` of a registered ModelVersion (its `ref`)."""
    return str(version.ref)


def report_dir(run_dir: str) -> str:
    """Where the end-of-run report goes: `<run dir>/report`, or `./.kiln/reports/<run name>`
    when the run directory is a remote URI."""
    from kiln import storage

    if storage.is_uri(run_dir) and not run_dir.startswith("file://"):
        name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        return os.path.abspath(os.path.join(".kiln", "reports", name))
    return os.path.join(run_dir.removeprefix("file://"), REPORT_DIR)


__all__ = ["MODEL_TAG", "Tracker", "model_tag", "report_dir", "spec_params"]
