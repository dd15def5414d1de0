"""A real 2-worker regression run saves its evaluation with the registered model (a residual
sample gathered from both workers, bounded), and its tracked run renders a report with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kiln.config import validate_spec
from kiln.registry import Registry
from kiln.report import build_report
from kiln.tracking import open_store
from kiln.train.metrics import RESIDUAL_SAMPLE_SIZE
from kiln.train.run import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_regression_evaluation_and_report(tmp_path: Path) -> None:
    from kiln.data.examples import write_synth

    data = tmp_path / "synth"
    write_synth(data, rows=5000, features=4, task="regression", shards=2, test_fraction=0.5, seed=5)
    validation_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (data / "test").iterdir())
    assert validation_rows > RESIDUAL_SAMPLE_SIZE
    spec = validate_spec(
        {
            "name": "synth-eval",
            "data": {
                "train": str(data / "train"),
                "validation": str(data / "test"),
                "label": "label",
                "task": "regression",
            },
            "model": {"hidden_sizes": [16]},
            "train": {
                "epochs": 2,
                "batch_size": 64,
                "num_workers": 2,
                "storage": str(tmp_path / "runs"),
                "log_every": 1000,
            },
            "registry": str(tmp_path / "registry"),
        }
    )
    outcome = run(spec)
    documents = Registry(spec.registry).show(outcome.model.ref)["documents"]
    evaluation = documents["evaluation.json"]
    best = documents["metrics.json"]["best"]
    assert evaluation["epoch"] == best["epoch"]  # the registered checkpoint's own epoch
    assert evaluation["rows"] == validation_rows
    assert evaluation["mse"] == pytest.approx(best["val_mse"], rel=1e-9)
    sample = evaluation["residual_sample"]
    assert len(sample["actual"]) == len(sample["predicted"]) == RESIDUAL_SAMPLE_SIZE
    labels = np.sort(pq.read_table(data / "test", columns=["label"]).column("label").to_numpy())
    actual = np.asarray(sample["actual"])
    nearest = labels[np.clip(np.searchsorted(labels, actual), 0, len(labels) - 1)]
    below = labels[np.clip(np.searchsorted(labels, actual) - 1, 0, len(labels) - 1)]
    gap = np.minimum(np.abs(nearest - actual), np.abs(below - actual))
    assert (gap < 1e-4 * (1 + np.abs(actual))).all()  # every kept "actual" is a validation label

    record = open_store().list(kind="train")[0]
    assert record.model == outcome.model.ref
    page, report = build_report(open_store().get(record.run_id), tmp_path / "report.html")
    assert [f.name for f in report.figures] == ["loss", "metrics", "residuals", "throughput"]
    assert (
        f"a uniform sample of {RESIDUAL_SAMPLE_SIZE} of {validation_rows} rows" in page.read_text()
    )
