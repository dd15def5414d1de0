"""The tracking store: MLflow behind the few calls kiln makes, read back as RunRecords.

MLflow is imported on first use only (`kiln --help` and most commands never pay for it). The
default store is an sqlite database at `./.kiln/mlflow.db` (MLflow 3 refuses its old file
store); an sqlite store keeps artefacts in `mlartifacts/` beside its database file.
"""

from __future__ import annotations

import builtins
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kiln.errors import KilnError
from kiln.tracking.record import RunRecord

logger = logging.getLogger(__name__)

DEFAULT_DB = os.path.join(".kiln", "mlflow.db")
ARTIFACTS_DIR = "mlartifacts"
KIND_TAG = "kiln.kind"
PARENT_TAG = "kiln.parent_run_id"
MODEL_TAG = "kiln.model"
_PARAM_LIMIT = 6000  # MLflow's longest param value
_BATCH = 100  # params per log_batch call MLflow accepts
_STATUSES = {"FINISHED", "FAILED", "KILLED"}


def default_uri(uri: str | None = None) -> str:
    """`uri`, else `$MLFLOW_TRACKING_URI`, else sqlite on `./.kiln/mlflow.db` (absolute)."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    return "sqlite:///" + os.path.abspath(DEFAULT_DB)


def open_store(uri: str | None = None) -> Store:
    """The tracking store at `uri` (see `default_uri`); an sqlite database is created on first
    use, with its folder."""
    return Store(default_uri(uri))


def _mlflow_client(uri: str) -> Any:
    import mlflow  # noqa: F401  (configures MLflow's loggers on import; quieted below)
    from mlflow import MlflowClient

    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    db = _sqlite_path(uri)
    if db is not None:
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _sqlite_path(uri: str) -> str | None:
    """The database file of a `sqlite:///...` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return unquote(uri[len("sqlite:///") :]) or None


class Store:
    """Runs in one MLflow tracking store: written by kiln's drivers, read by `kiln runs` and the
    report."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = _mlflow_client(self.uri)
            except Exception as exc:  # a bad URI or an unreachable server: the user's to fix
                raise KilnError(f"tracking store {self.uri}: {exc}") from exc
        return self._client

    # -- writing -----------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created if missing (sqlite stores: artefacts beside the db)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        location = None
        db = _sqlite_path(self.uri)
        if db is not None:
            location = Path(os.path.dirname(os.path.abspath(db)), ARTIFACTS_DIR).as_uri()
        return str(self.client.create_experiment(name, artifact_location=location))

    def create_run(
        self,
        *,
        experiment: str,
        kind: str,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent: str | None = None,
    ) -> str:
        """Start a RUNNING run and return its id."""
        all_tags = {KIND_TAG: kind, **(tags or {})}
        if parent is not None:
            all_tags |= {PARENT_TAG: parent, "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=all_tags)
        run_id = str(run.info.run_id)
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _param_text(value)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start : start + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> int:
        """Log the finite numeric values of `metrics` at `step`; returns how many."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, int(step))
            for key, value in numeric_metrics(metrics).items()
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)
        return len(items)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)) for key, value in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items)

    def end_run(self, run_id: str, status: str) -> None:
        if status not in _STATUSES:
            raise ValueError(f"run status {status!r}; expected one of {sorted(_STATUSES)}")
        self.client.set_terminated(run_id, status)

    def reopen(self, run_id: str) -> bool:
        """Mark an existing run RUNNING again (a resumed run); False if the store lacks it."""
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # MLflow raises its own exception types for unknown ids
            return False
        return True

    def log_artifacts(self, run_id: str, local_dir: str | Path) -> None:
        """Copy every file under `local_dir` into the run's artefacts."""
        self.client.log_artifacts(run_id, str(local_dir))

    # -- reading -----------------------------------------------------------------------

    def list(
        self, kind: str | None = None, name: str | None = None, limit: int = 50
    ) -> builtins.list[RunRecord]:
        """Runs of every experiment, newest first; `kind`/`name` filter on exact values."""
        if not self._readable():
            return []
        runs = self._search(_filter(kind=kind, name=name), limit)
        return [self._record(run, full_metrics=False) for run in runs]

    def get(self, run_id: str) -> RunRecord:
        """The run with this id or unique id prefix, with every metric's full history.

        Raises:
            KilnError: no run, or several runs, match `run_id`.
        """
        return self._record(self._resolve(run_id), full_metrics=True)

    def children(self, run_id: str) -> builtins.list[RunRecord]:
        """A sweep's trial runs (full metric histories), oldest first."""
        parent = self._resolve(run_id).info.run_id
        runs = self._search(f"tags.`{PARENT_TAG}` = '{parent}'", None)
        return [self._record(run, full_metrics=True) for run in reversed(runs)]

    def find(self, tags: Mapping[str, str]) -> RunRecord | None:
        """The newest run carrying every tag in `tags`, or None."""
        clauses = [f"tags.`{key}` = '{_quote(value)}'" for key, value in tags.items()]
        runs = self._search(" and ".join(clauses), 1)
        return self._record(runs[0], full_metrics=False) if runs else None

    def _readable(self) -> bool:
        """False for an sqlite store whose database does not exist yet: reading it would create
        it, in whatever folder `kiln runs` was typed."""
        db = _sqlite_path(self.uri)
        return db is None or self._client is not None or os.path.exists(db)

    def _experiment_ids(self) -> builtins.list[str]:
        from mlflow.entities import ViewType

        experiments = self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
        return [str(e.experiment_id) for e in experiments]

    def _search(self, filter_string: str, limit: int | None) -> builtins.list[Any]:
        ids = self._experiment_ids()
        if not ids:
            return []
        found: builtins.list[Any] = []
        token = None
        while True:
            page_size = 1000 if limit is None else min(limit - len(found), 1000)
            page = self.client.search_runs(
                ids,
                filter_string=filter_string,
                order_by=["attributes.start_time DESC"],
                max_results=page_size,
                page_token=token,
            )
            found.extend(page)
            token = page.token
            if not token or (limit is not None and len(found) >= limit):
                return found

    def _resolve(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        wanted = run_id.strip().lower()
        if not self._readable():
            raise KilnError(f"run {run_id!r}: no such run ({self.uri} holds no runs yet)")
        if len(wanted) == 32:
            try:
                return self.client.get_run(wanted)
            except MlflowException:
                pass
        if not wanted or not all(c in "0123456789abcdef" for c in wanted):
            raise KilnError(f"run {run_id!r}: not a run id (hexadecimal, as `kiln runs list`)")
        matches = [run for run in self._search("", None) if run.info.run_id.startswith(wanted)]
        if not matches:
            raise KilnError(f"run {run_id!r}: no such run in {self.uri}")
        if len(matches) > 1:
            ids = ", ".join(run.info.run_id[:12] for run in matches[:5])
            raise KilnError(f"run {run_id!r}: ambiguous, matches {len(matches)} runs ({ids})")
        return matches[0]

    def _record(self, run: Any, *, full_metrics: bool) -> RunRecord:
        info, data = run.info, run.data
        metrics: dict[str, list[tuple[int, float]]] = {}
        for key in sorted(data.metrics):
            if full_metrics:
                history = self.client.get_metric_history(info.run_id, key)
                ordered = sorted(history, key=lambda m: (int(m.step), int(m.timestamp)))
                metrics[key] = _last_per_step([(int(m.step), float(m.value)) for m in ordered])
            else:
                metrics[key] = [(0, float(data.metrics[key]))]
        return RunRecord(
            run_id=info.run_id,
            kind=data.tags.get(KIND_TAG, "train"),
            name=info.run_name or data.tags.get("mlflow.runName", ""),
            status=info.status,
            start_time=info.start_time / 1000.0,
            end_time=info.end_time / 1000.0 if info.end_time else None,
            params=dict(data.params),
            tags={k: v for k, v in data.tags.items() if not k.startswith("mlflow.")},
            metrics=metrics,
            artifact_dir=_local_dir(info.artifact_uri),
        )


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite int/float values of `metrics` (bools, lists, text and `epoch` left out)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "epoch"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as dotted keys (`train.deepspeed.zero_stage`) with text values; lists
    and empty mappings become JSON, None becomes `null`."""
    import json

    if isinstance(value, Mapping) and value:
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat |= flatten(item, f"{prefix}{key}.")
        return flat
    text = value if isinstance(value, str) else json.dumps(value)
    return {prefix.rstrip("."): text}


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_LIMIT else text[: _PARAM_LIMIT - 3] + "..."


def _last_per_step(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One value per step (a resumed run may log an epoch twice: the later one wins); `points`
    come in step, then logging, order."""
    by_step: dict[int, float] = {}
    for step, value in points:
        by_step[step] = value
    return sorted(by_step.items())


def _filter(*, kind: str | None, name: str | None) -> str:
    clauses = []
    if kind:
        clauses.append(f"tags.`{KIND_TAG}` = '{_quote(kind)}'")
    if name:
        clauses.append(f"attributes.run_name = '{_quote(name)}'")
    return " and ".join(clauses)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _local_dir(artifact_uri: str | None) -> str | None:
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return artifact_uri
    return None
