"""The metric catalog (kiln.metrics): valid Prometheus names and labels, the series names Ray's
exporter shows, the objects the factories create, what the training loop and the batch job
export, and docs/metrics.md documenting every series."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kiln import metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "metrics.md"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Added by Ray Serve in a replica, or by Ray's exporter, or special to Prometheus.
# `job` and `instance` Prometheus sets on every scraped series (an exported one is renamed).
_RESERVED = {"deployment", "replica", "application", "le", "quantile", "job", "instance"}


class Recorder:
    """Stands in for a ray.util.metrics object: remembers its calls."""

    def __init__(self, name: str, default_tags: dict[str, str] | None = None) -> None:
        self.name, self.default_tags, self.calls = name, default_tags or {}, []

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, {**self.default_tags, **(tags or {})}))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, {**self.default_tags, **(tags or {})}))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    """`kiln.metrics.create`/`shared` record instead of creating Ray metrics."""
    made: dict[str, Recorder] = {}

    def create(name: str, *, serve: bool = False, default_tags: Any = None) -> Recorder:
        metrics.get(name)  # unknown names fail as they would for real
        made[name] = made.get(name) or Recorder(name, default_tags)
        return made[name]

    monkeypatch.setattr(metrics, "create", create)
    monkeypatch.setattr(metrics, "shared", create)
    return made


@pytest.mark.parametrize("metric", list(metrics.CATALOG.values()), ids=lambda m: m.name)
def test_every_entry_is_a_valid_prometheus_metric(metric: metrics.MetricDef) -> None:
    assert _NAME.fullmatch(metric.name) and metric.name.startswith("kiln_")
    assert metric.help.strip() and metric.area in ("serving", "training", "scoring", "drift")
    assert len(set(metric.tags)) == len(metric.tags)
    for tag in metric.tags:
        assert _LABEL.fullmatch(tag) and not tag.startswith("__"), tag
        assert tag not in _RESERVED, f"{metric.name}: tag {tag!r} is set by Ray or Prometheus"
    if metric.kind == "histogram":
        bounds = list(metric.boundaries)
        assert bounds == sorted(set(bounds)) and bounds[0] > 0, bounds
    # Series names must not collide with another entry's (a gauge `x_total`, a counter `x`).
    others = metrics.series_index(m for m in metrics.CATALOG.values() if m is not metric)
    assert not set(metrics.prometheus_series(metric)) & set(others)


def test_serving_metrics_are_per_model_and_version() -> None:
    for metric in metrics.CATALOG.values():
        if metric.area in ("serving", "scoring", "drift"):
            assert {"model", "version"} <= set(metric.tags), metric.name
    assert "code" in metrics.get("kiln_request_errors").tags
    assert "job_name" in metrics.get("kiln_train_loss").tags


def test_series_names_follow_rays_exporter() -> None:
    """As scraped from Ray 2.60 (tests/integration/test_metrics_export.py checks it live)."""
    assert metrics.prometheus_series(metrics.get("kiln_requests")) == ("ray_kiln_requests_total",)
    assert metrics.prometheus_series(metrics.get("kiln_request_latency_ms")) == (
        "ray_kiln_request_latency_ms_bucket",
        "ray_kiln_request_latency_ms_sum",
        "ray_kiln_request_latency_ms_count",
    )
    assert metrics.prometheus_series(metrics.get("kiln_queue_depth")) == ("ray_kiln_queue_depth",)
    index = metrics.series_index()
    assert index["ray_kiln_score_rows_total"].name == "kiln_score_rows"


def test_unknown_names_and_misdeclared_entries_are_refused() -> None:
    with pytest.raises(KeyError, match="kiln_nope is not in kiln.metrics.CATALOG"):
        metrics.create("kiln_nope")
    with pytest.raises(ValueError, match="boundaries"):
        metrics.MetricDef("kiln_x", "histogram", "serving", "x", ())
    with pytest.raises(ValueError, match="start with kiln_"):
        metrics.MetricDef("requests", "counter", "serving", "x", ())
    different = metrics.MetricDef("kiln_requests", "gauge", "serving", "other", ())
    with pytest.raises(ValueError, match="already declared differently"):
        metrics.register(different)


@pytest.mark.parametrize("name", ["kiln_requests", "kiln_queue_depth", "kiln_batch_size"])
def test_create_builds_rays_metric_from_the_entry(name: str) -> None:
    from ray.util import metrics as ray_metrics

    entry = metrics.get(name)
    made = metrics.create(name, default_tags={"model": "m", "version": "1"})
    kind = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge}
    assert isinstance(made, kind.get(entry.kind, ray_metrics.Histogram))
    assert made.info["name"] == name and made.info["description"] == entry.help
    assert tuple(made.info["tag_keys"]) == entry.tags
    assert made.info["default_tags"] == {"model": "m", "version": "1"}
    if entry.kind == "histogram":
        assert tuple(made.boundaries) == entry.boundaries


def test_training_samples_map_an_epochs_results() -> None:
    results = {
        "epoch": 3,
        "step": 120,
        "train_loss": 0.25,
        "samples_per_s": 1500.0,
        "lr": 1e-3,
        "resumed_from_epoch": 0,
        "worker_nodes": "a,b",
        "val_loss": 0.3,
        "val_accuracy": 0.91,
        "val_perplexity": math.inf,
        "val_broken": math.nan,
        "val_flag": True,
    }
    samples = metrics.training_samples(results, "digits-mlp", "digits-mlp-20260101-000000")
    run = {"job_name": "digits-mlp", "run": "digits-mlp-20260101-000000"}
    assert samples == [
        ("kiln_train_epoch", 3.0, run),
        ("kiln_train_step", 120.0, run),
        ("kiln_train_loss", 0.25, run),
        ("kiln_train_samples_per_second", 1500.0, run),
        ("kiln_train_learning_rate", 1e-3, run),
        ("kiln_train_validation", 0.3, {**run, "metric": "loss"}),
        ("kiln_train_validation", 0.91, {**run, "metric": "accuracy"}),
    ]
    for name, _, tags in samples:
        assert set(tags) == set(metrics.get(name).tags)


def test_rank_zero_sets_the_training_gauges(recorded: dict[str, Recorder]) -> None:
    from kiln.train import loop

    loop._export_metrics({"epoch": 1, "train_loss": 0.5, "val_accuracy": 0.8}, "j", "j-1")
    assert recorded["kiln_train_loss"].calls == [("set", 0.5, {"job_name": "j", "run": "j-1"})]
    assert recorded["kiln_train_validation"].calls == [
        ("set", 0.8, {"job_name": "j", "run": "j-1", "metric": "accuracy"})
    ]


def test_a_metrics_failure_does_not_stop_training(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kiln.train import loop

    def broken(name: str, **_: Any) -> Any:
        raise RuntimeError("exporter down")

    monkeypatch.setattr(metrics, "shared", broken)
    loop._export_metrics({"epoch": 1}, "j", "j-1")
    assert "could not export training metrics" in caplog.text


def test_scoring_actors_count_rows_per_model_version(recorded: dict[str, Recorder]) -> None:
    from kiln.inference.batch import _RowActor

    job: Any = SimpleNamespace(names=("a.parquet",), model="digits-mlp:3", counter=None)
    actor = _RowActor(job)
    actor._count(100, 2)
    actor._count(50, 0)
    tags = {"model": "digits-mlp", "version": "3"}
    assert recorded["kiln_score_rows"].calls == [("inc", 100, tags), ("inc", 50, tags)]
    assert recorded["kiln_score_quarantined_rows"].calls == [("inc", 2, tags)]


def test_model_tags_split_an_exact_ref() -> None:
    assert metrics.model_tags("digits-mlp:12") == {"model": "digits-mlp", "version": "12"}
    assert metrics.model_tags("ns/name:3") == {"model": "ns/name", "version": "3"}


def test_docs_list_every_series_with_its_type_and_labels() -> None:
    text = DOCS.read_text()
    for metric in metrics.CATALOG.values():
        for series in metrics.prometheus_series(metric):
            assert f"`{series}`" in text, f"docs/metrics.md does not document {series}"
        row = next(
            (line for line in text.splitlines() if line.startswith(f"| `{metric.name}`")), None
        )
        assert row is not None, f"docs/metrics.md has no table row for {metric.name}"
        assert metric.kind in row, row
        for tag in metric.tags:
            assert f"`{tag}`" in row, f"{metric.name}: tag {tag} is not documented"
