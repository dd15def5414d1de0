"""kiln's metrics as Prometheus really shows them. A small served model answers some requests
(one of them a 4xx), then Ray's metrics endpoint is scraped until every serving metric the
Grafana dashboard queries is there, tagged with the served model and version; a small scoring
job with two bad rows shows its exact row counts. (Training's gauges are checked at unit level:
tests/unit/test_metrics.py.)"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch

from kiln import metrics
from kiln.models import build_model
from kiln.registry import Registry
from tests.integration.digits_model import FEATURES, fitted_digits
from tests.unit import grafana
from tests.unit.test_predictor import register_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

SERVED = "metrics-digits"  # a name no other test module serves: its series are this module's
TIMEOUT = 30
SCRAPE_DEADLINE_S = 60  # Ray exports what processes record every few seconds


@pytest.fixture(scope="module")
def registry(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """digits-mlp version 1: fitted preprocessing, untrained weights (only metrics matter)."""
    root = str(tmp_path_factory.mktemp("metrics") / "registry")
    spec, pre, _table, documents = fitted_digits(digits_dir, [16])
    torch.manual_seed(0)
    module = build_model(spec.model, pre.input_schema())
    Registry(root).register("digits-mlp", module.state_dict(), documents)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(registry: str) -> Iterator[str]:
    from ray import serve

    from kiln.inference.serve import build_app, http_options
    from kiln.inference.serve_spec import validate_serve_spec

    spec = validate_serve_spec(
        {
            "registry": registry,
            "http": {"host": "127.0.0.1", "port": _free_port()},
            "ingress": {"num_cpus": 0.1},
            "models": [
                {
                    "name": SERVED,
                    "ref": "digits-mlp:1",
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_cpus": 0.25},
                }
            ],
        },
        "test spec",
    )
    serve.start(http_options=http_options(spec))
    try:
        serve.run(build_app(spec.model_dump(mode="json")), name="kiln-metrics", route_prefix="/")
        yield f"http://127.0.0.1:{spec.http.port}"
    finally:
        serve.shutdown()


def _metrics_url() -> str:
    import ray

    [node] = [n for n in ray.nodes() if n["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of series `name` in a Prometheus text exposition."""
    found = []
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}}", text, re.MULTILINE):
        found.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1))))
    return found


def _missing(text: str, names: set[str]) -> list[str]:
    """Dashboard series with no sample for the served model's version 1."""
    return sorted(
        name
        for name in names
        if not any(
            labels.get("model") == SERVED and labels.get("version") == "1"
            for labels in _samples(text, name)
        )
    )


def _absent(text: str, names: set[str]) -> list[str]:
    return sorted(name for name in names if not re.search(rf"^{name}[{{ ]", text, re.MULTILINE))


def test_every_serving_series_the_dashboard_queries_is_exported(server: str) -> None:
    url = f"{server}/v1/models/{SERVED}:predict"
    good = {"instances": [dict.fromkeys(FEATURES, 1.0)]}
    for _ in range(3):
        assert requests.post(url, json=good, timeout=TIMEOUT).status_code == 200
    bad = requests.post(url, json={"instances": [{"px_00": 1.0}]}, timeout=TIMEOUT)
    assert bad.status_code == 400, bad.text

    served = metrics.series_index(m for m in metrics.CATALOG.values() if m.area == "serving")
    wanted = grafana.dashboard_metric_names() & set(served)
    wanted.discard("ray_kiln_generated_tokens_total")  # a language model's: not served here
    assert {"ray_kiln_requests_total", "ray_kiln_request_latency_ms_bucket"} <= wanted
    ray_series = grafana.dashboard_metric_names() & grafana.RAY_SERIES
    deadline, text = time.monotonic() + SCRAPE_DEADLINE_S, ""
    while time.monotonic() < deadline:
        text = requests.get(_metrics_url(), timeout=TIMEOUT).text
        if not _missing(text, wanted) and not _absent(text, ray_series):
            break
        time.sleep(1)
    assert not _missing(text, wanted), _missing(text, wanted)
    # Ray Serve's own series the dashboard uses are there too.
    assert not _absent(text, ray_series), _absent(text, ray_series)

    mine = [s for s in _samples(text, "ray_kiln_requests_total") if s.get("model") == SERVED]
    assert {s["code"] for s in mine} == {"200", "400"}, mine
    errors = [s for s in _samples(text, "ray_kiln_request_errors_total") if s["model"] == SERVED]
    assert {s["code"] for s in errors} == {"400"}, errors
    replicas = [s for s in _samples(text, "ray_kiln_replica_up") if s["model"] == SERVED]
    assert len(replicas) == 1 and replicas[0]["replica"], replicas


def _value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`."""
    values = [
        float(match.group(2))
        for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
        if all(f'{key}="{value}"' in match.group(1) for key, value in labels.items())
    ]
    return sum(values) if values else None


def test_scoring_counts_rows_and_quarantined_rows(digits_dir: Path, tmp_path: Path) -> None:
    from kiln.inference.batch import score

    train = pq.read_table(digits_dir / "train")
    register_tiny_model(
        tmp_path / "registry", train, name="metrics-score", preprocess={"missing": "drop"}
    )
    rows = pq.read_table(digits_dir / "test").slice(0, 40)
    values = rows.column("px_05").to_pylist()
    values[3] = values[9] = None  # dropped as missing: quarantined
    index = rows.schema.get_field_index("px_05")
    rows = rows.set_column(index, "px_05", pa.array(values, rows.schema.field(index).type))
    (tmp_path / "in").mkdir()
    pq.write_table(rows, tmp_path / "in" / "part.parquet")
    summary = score(
        "metrics-score:1",
        registry=str(tmp_path / "registry"),
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        on_error="quarantine",
    )
    assert (summary.rows_out, summary.rows_quarantined) == (38, 2)

    tags = {"model": "metrics-score", "version": "1"}
    wanted = {"ray_kiln_score_rows_total": 38.0, "ray_kiln_score_quarantined_rows_total": 2.0}
    deadline, seen = time.monotonic() + SCRAPE_DEADLINE_S, {}
    while time.monotonic() < deadline:
        text = requests.get(_metrics_url(), timeout=TIMEOUT).text
        seen = {name: _value(text, name, **tags) for name in wanted}
        if seen == wanted:
            break
        time.sleep(1)
    assert seen == wanted
