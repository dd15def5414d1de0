"""What kiln remembers of one run (train, tune, score, retrain): the shape `kiln runs`, `kiln
report` and the end-of-run report all read, whatever tracking store it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RunKind = Literal["train", "tune", "trial", "score", "retrain"]


@dataclass
class RunRecord:
    """One tracked run.

    Attributes:
        run_id: the tracking store's id (MLflow run id).
        kind: what ran; a sweep is a `tune` run whose trials are `trial` runs (children).
        name: the job name (the model name for train/tune/retrain; the output for score).
        status: RUNNING, FINISHED, FAILED or KILLED.
        start_time, end_time: seconds since the epoch (end_time None while running).
        params: the spec flattened to dotted keys (`train.lr`), values as strings.
        tags: free-form tags; `kiln.model` is the registered `name:version`,
            `kiln.parent_run_id` links a trial to its sweep, `kiln.run_dir` the Ray run directory.
        metrics: every logged metric's history as (step, value) pairs in step order; per-epoch
            metrics use the epoch as the step, one-off results step 0.
        artifact_dir: a local directory holding the run's artefacts (report, plots), or None when
            the store keeps them elsewhere.
    """

    run_id: str
    kind: RunKind
    name: str
    status: str
    start_time: float
    end_time: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifact_dir: str | None = None

    @property
    def model(self) -> str | None:
        """The registered model version this run produced or used (`name:version`), if any."""
        return self.tags.get("kiln.model")

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get("kiln.parent_run_id")

    def last(self, metric: str) -> float | None:
        """The metric's last logged value, or None."""
        history = self.metrics.get(metric)
        return history[-1][1] if history else None
