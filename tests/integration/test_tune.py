"""Sweeps on a local Ray (2 CPUs): per-epoch metrics reach Tune so ASHA stops a bad trial, the
best trial is registered with its sweep lineage, and an impossible plan fails in seconds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from kiln.config import JobSpec, validate_spec
from kiln.errors import KilnError
from kiln.registry import Registry
from kiln.registry.model import load_model
from kiln.tune import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def sweep_spec(digits_dir: Path, tmp_path: Path, tune: dict[str, Any], **train: Any) -> JobSpec:
    return validate_spec(
        {
            "name": "digits-sweep-test",
            "data": {
                "train": str(digits_dir / "train"),
                "validation": str(digits_dir / "test"),
                "label": "label",
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": [64]},
            "train": {
                "epochs": 2,
                "batch_size": 64,
                "num_workers": 1,
                "log_every": 1000,
                "storage": str(tmp_path / "runs"),
                **train,
            },
            "registry": str(tmp_path / "registry"),
            "tune": tune,
        }
    )


@pytest.mark.slow
def test_asha_sweep_stops_the_bad_trial_and_registers_the_best(
    digits_dir: Path, tmp_path: Path
) -> None:
    # A grid runs in order, one trial at a time on 2 CPUs: the good learning rate first, then
    # one too small to learn in time, which ASHA (grace period 1) stops after its first epoch;
    # the third trial then needs the CPUs the stopped one held.
    spec = sweep_spec(
        digits_dir,
        tmp_path,
        {
            "num_samples": 1,
            "space": {"train.lr": {"sample": "grid", "values": [0.01, 1e-5, 0.003]}},
            "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        },
    )
    outcome = run(spec)

    import ray

    good, third, bad = sorted(outcome.rows, key=lambda row: -row["train.lr"])
    assert (good["status"], good["epochs"]) == ("completed", 2)
    assert len(good["per_epoch"]) == 2  # every epoch's metrics reached Tune
    assert good["val_accuracy"] > 0.85
    assert (bad["status"], bad["epochs"]) == ("stopped early", 1)
    assert bad["val_accuracy"] < good["val_accuracy"]
    assert third["status"] in ("completed", "stopped early") and third["epochs"] >= 1
    assert outcome.best["trial"] == good["trial"]
    # a stopped trial's training run was aborted: no workers' placement group is left behind
    groups = ray.util.placement_group_table().values()
    assert [g for g in groups if g["state"] != "REMOVED"] == []

    registry = Registry(spec.registry)
    documents = registry.show(outcome.model.ref)["documents"]
    lineage = documents["lineage.json"]
    assert lineage["sweep"]["trial"] == good["trial"]
    assert lineage["sweep"]["params"] == {"train.lr": 0.01}
    assert lineage["sweep"]["dir"] == outcome.sweep_dir
    assert lineage["sweep"]["scheduler"] == "asha" and lineage["sweep"]["trials"] == 3
    assert lineage["spec"]["train"]["lr"] == 0.01  # the trial's spec, as `kiln train` runs it
    assert lineage["checkpoint"].startswith(str(Path(outcome.sweep_dir, "runs", good["trial"])))
    metrics = documents["metrics.json"]
    assert metrics["best"]["val_accuracy"] == pytest.approx(good["val_accuracy"])
    assert [epoch["epoch"] for epoch in metrics["history"]] == [1, 2]
    assert load_model(registry, outcome.model.ref).module is not None  # verified and loadable
    profile = documents["profile.json"]  # drift monitoring of the sweep's model
    rows = pq.ParquetDataset(str(digits_dir / "train")).read().num_rows
    assert profile["rows"] == rows and len(profile["features"]) == 64
    assert all(sum(f["counts"]) + f["missing"] == rows for f in profile["features"])

    sweep = Path(outcome.sweep_dir)
    table = pq.read_table(sweep / "results.parquet").to_pylist()
    assert len(table) == 3 and {"completed", "stopped early"} <= {r["status"] for r in table}
    for name in ("results.csv", "metric_per_epoch.png", "metric_vs_params.png"):
        assert (sweep / name).stat().st_size > 0


def test_unschedulable_sweep_fails_in_seconds_with_the_numbers(
    digits_dir: Path, tmp_path: Path
) -> None:
    tune = {"space": {"train.lr": {"sample": "uniform", "low": 0.001, "high": 0.01}}}
    too_big = sweep_spec(digits_dir, tmp_path, tune, resources_per_worker={"CPU": 3})
    start = time.monotonic()
    with pytest.raises(KilnError, match=r"1 workers x 3 CPU \+ 1 CPU for Ray Data"):
        run(too_big)
    too_many = sweep_spec(digits_dir, tmp_path, {**tune, "max_concurrent_trials": 2})
    with pytest.raises(KilnError, match=r"tune.max_concurrent_trials=2: .* room for 1"):
        run(too_many)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/runs"))
