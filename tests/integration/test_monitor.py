"""Drift monitoring on the session's local Ray: the training profile registered with a model
(streamed by Ray Data at `kiln train` time), live drift in serving (`GET .../drift`, `kiln
monitor`), and the drift of a batch-scored file."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
from safetensors.torch import save_file

from kiln.cli.main import main
from kiln.config import validate_spec
from kiln.data.source import check_data
from kiln.inference.batch import score
from kiln.models import build_model
from kiln.monitor import Profile, profile_table
from kiln.registry import Registry
from kiln.train import run as train_run
from kiln.train.export import register_checkpoint
from kiln.train.loop import WEIGHTS_FILE

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

FEATURES = [f"px_{i:02d}" for i in range(64)]
SHIFTED = "px_20"
TOKEN = "kiln-monitor-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 30


@pytest.fixture(scope="module")
def registered(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """digits-mlp registered the way `kiln train` registers it (profile included), with weights
    from a few plain-torch steps instead of a Ray Train run."""
    from ray.train import Checkpoint

    folder = tmp_path_factory.mktemp("monitor")
    spec = validate_spec(
        {
            "name": "digits-mlp",
            "registry": str(folder / "registry"),
            "data": {
                "train": str(digits_dir / "train"),
                "validation": str(digits_dir / "test"),
                "label": "label",
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": [32]},
        }
    )
    plan = train_run._plan(spec)
    prepared = train_run.prepare(spec, plan, check_data(spec.data), run_dir=str(folder / "run"))
    profile = train_run.training_profile(prepared, plan)
    table = pq.read_table(sorted((digits_dir / "train").glob("*.parquet")))
    arrays = prepared.preprocessor.transform(table)
    torch.manual_seed(0)
    module = build_model(spec.model, prepared.preprocessor.input_schema())
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            module(torch.from_numpy(arrays["x"])), torch.from_numpy(arrays["y"])
        )
        loss.backward()
        optimizer.step()
    (folder / "ckpt").mkdir()
    save_file(module.state_dict(), str(folder / "ckpt" / WEIGHTS_FILE))
    version = register_checkpoint(
        Registry(spec.registry),
        spec,
        Checkpoint.from_directory(str(folder / "ckpt")),
        prepared.preprocessor,
        metrics={"val_loss": float(loss.detach())},
        history=[],
        lineage={},
        profile=profile,
    )
    return {"registry": spec.registry, "ref": version.ref, "train": table, "folder": folder}


def test_the_training_profile_is_registered_and_matches_the_training_split(
    registered: dict[str, Any],
) -> None:
    registry = Registry(registered["registry"])
    stored = registry.read_document(registry.resolve(registered["ref"]), "profile.json")
    profile = Profile.from_dict(stored)
    assert profile.names == FEATURES and profile.rows == registered["train"].num_rows
    # Streamed by Ray Data in two passes, the same as profiling the table in memory.
    local = profile_table(registered["train"], numeric=FEATURES)
    assert [f.edges for f in profile.features] == [f.edges for f in local.features]
    assert [f.counts for f in profile.features] == [f.counts for f in local.features]
    assert profile.feature(SHIFTED).mean == pytest.approx(local.feature(SHIFTED).mean)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(registered: dict[str, Any]) -> Iterator[str]:
    """One model served inside the ingress, token auth, counts flushed every 0.5 s."""
    from ray import serve

    from kiln.inference.serve import build_app

    token_file = registered["folder"] / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    spec = {
        "name": "monitored",
        "registry": registered["registry"],
        "http": {"port": port},
        "auth": {"token_file": str(token_file)},
        "models": [
            {"name": "digits", "ref": registered["ref"], "ray_actor_options": {"num_cpus": 0.25}}
        ],
        "monitor": {"flush_interval_s": 0.5, "min_samples": 50},
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(spec), name="monitored", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _shifted(table: pa.Table, std: float) -> pa.Table:
    index = table.schema.get_field_index(SHIFTED)
    values = table.column(SHIFTED).to_numpy() + 3 * std
    return table.set_column(index, SHIFTED, pa.array(values.astype(np.float32)))


def _send(server: str, table: pa.Table, rows: int = 60) -> None:
    for start in range(0, table.num_rows, rows):
        chunk = table.slice(start, rows).select(FEATURES).to_pylist()
        response = requests.post(
            f"{server}/v1/models/digits:predict",
            json={"instances": chunk},
            headers=AUTH,
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text


def _monitor(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["monitor", *args])
    return code, out.getvalue(), err.getvalue()


def _metrics_url() -> str:
    import ray

    [node] = [n for n in ray.nodes() if n["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _gauge(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` with `labels` in a Prometheus exposition (NaN
    when there is none)."""
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        if all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            return float(match.group(2))
    return float("nan")


def _drift(server: str, **params: str) -> dict[str, Any]:
    response = requests.get(
        f"{server}/v1/models/digits/drift", params=params, headers=AUTH, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def test_shifted_live_inputs_raise_that_features_drift_and_kiln_monitor_says_so(
    server: str, registered: dict[str, Any], digits_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.setenv("KILN_TEST_TOKEN", TOKEN)
    flags = ["--url", server, "--token-env", "KILN_TEST_TOKEN"]
    code, _, err = _monitor("digits", *flags)
    assert code == 2 and "no live traffic for digits in the last 1h" in err
    assert requests.get(f"{server}/v1/models/digits/drift", timeout=TIMEOUT).status_code == 401

    test = pq.read_table(sorted((digits_dir / "test").glob("*.parquet")))
    _send(server, test)
    [calm] = _drift(server, window="15m")["versions"]
    assert calm["samples"] == test.num_rows and calm["over"] == []
    assert max(f["psi"] for f in calm["features"]) < 0.1
    assert calm["verdict"].startswith("no drift: all 64 judged features under threshold")

    profile = Profile.from_dict(
        Registry(registered["registry"]).read_document(
            Registry(registered["registry"]).resolve(registered["ref"]), "profile.json"
        )
    )
    shifted = _shifted(test, float(profile.feature(SHIFTED).std or 0.0))
    _send(server, shifted)
    version = registered["ref"].rsplit(":", 1)[1]
    [report] = _drift(server, window="1h", version=version)["versions"]
    assert report["samples"] == 2 * test.num_rows and report["over"] == [SHIFTED]
    first, *others = report["features"]
    assert first["name"] == SHIFTED and first["psi"] > 1.0 and first["ks"] >= 0.45
    assert all(not f["over"] and f["psi"] < 0.1 and f["ks"] < 0.1 for f in others)

    code, out, _ = _monitor("digits", "--window", "1h", *flags)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].endswith(f"last 1h: {2 * test.num_rows} live inputs")
    assert lines[2].startswith(f"  !!{SHIFTED} ")
    assert f"verdict: DRIFT: 1 of 64 features over threshold ({SHIFTED})" in out

    # Counts live in the application's store, per time bucket (bounded), never as rows.
    store = ray.get_actor("kiln-drift-monitored", namespace="kiln")
    assert list(ray.get(store.buckets.remote()).values()) in ([1], [2])

    # The store exports the scores as Prometheus gauges on Ray's metrics endpoint.
    labels = {"model": "digits", "version": version}
    deadline, shifted_psi, text = time.monotonic() + 60, None, ""
    while time.monotonic() < deadline and not (shifted_psi and shifted_psi > 1.0):
        time.sleep(1)
        text = requests.get(_metrics_url(), timeout=TIMEOUT).text
        shifted_psi = _gauge(text, "ray_kiln_feature_drift_psi", feature=SHIFTED, **labels)
    assert shifted_psi == pytest.approx(first["psi"], rel=1e-3)
    assert _gauge(text, "ray_kiln_feature_drift_ks", feature=SHIFTED, **labels) >= 0.45
    assert _gauge(text, "ray_kiln_feature_drift_psi", feature=others[0]["name"], **labels) < 0.1
    assert _gauge(text, "ray_kiln_drift_samples", **labels) == 2 * test.num_rows

    code, _, err = _monitor("nope", *flags)
    assert code == 2 and "unknown model 'nope'" in err
    code, _, err = _monitor("digits", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach the kiln server" in err

    # Batch scoring reports the same drift for its input, committed beside the output.
    path = registered["folder"] / "shifted.parquet"
    pq.write_table(shifted, path)
    out_dir = registered["folder"] / "scored"
    summary = score(
        registered["ref"], registry=registered["registry"], input=str(path), output=str(out_dir)
    )
    assert summary.drift is not None and summary.drift["over"] == [SHIFTED]
    document = json.loads((out_dir / "_drift.json").read_text())
    assert document["samples"] == test.num_rows and document["over"] == [SHIFTED]
    assert not (out_dir / "_drift_parts").exists()
    scored = dict.fromkeys(f["name"] for f in document["features"][1:])
    assert len(scored) == 63 and SHIFTED not in scored


def test_bad_drift_queries_answer_4xx_and_name_the_problem(
    server: str, registered: dict[str, Any]
) -> None:
    response = requests.get(
        f"{server}/v1/models/digits/drift",
        params={"window": "soon"},
        headers=AUTH,
        timeout=TIMEOUT,
    )
    assert response.status_code == 400 and "window" in response.text
    missing = requests.get(
        f"{server}/v1/models/digits/drift", params={"version": "99"}, headers=AUTH, timeout=TIMEOUT
    )
    assert missing.status_code == 404 and "no version '99'" in missing.text
    assert (
        requests.get(f"{server}/v1/models/digits/drift", headers=AUTH, timeout=TIMEOUT).status_code
        == 200
    )
