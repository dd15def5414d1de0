"""Online serving on the session's local Ray: the Open Inference Protocol and :predict routes,
parity with the Predictor, auth, limits, errors, a canary split, overload, health checks, the
Serve config that `kiln serve build` writes, and (slow) autoscaling under load."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml

from kiln.cli.main import main
from kiln.inference import Predictor
from kiln.models import build_model
from kiln.registry import Registry
from tests.integration.digits_model import FEATURES, fitted_digits

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("ray_session"),
    # The test spec reports load every 0.5 s (Ray's default is 10 s) so autoscaling reacts fast.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

TOKEN = "kiln-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 30


@pytest.fixture(scope="module")
def registry(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two versions of digits-mlp, fitted for a few hundred plain-torch steps (seeds 0 and 1)."""
    root = str(tmp_path_factory.mktemp("serve") / "registry")
    spec, pre, table, documents = fitted_digits(digits_dir, [32])
    arrays = pre.transform(table)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    for seed, steps in ((0, 150), (1, 40)):
        torch.manual_seed(seed)
        module = build_model(spec.model, pre.input_schema())
        optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
        Registry(root).register("digits-mlp", module.state_dict(), documents)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def spec_file(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    (folder / "token").write_text(TOKEN + "\n")
    fast_scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        "look_back_period_s": 2,
        "metrics_interval_s": 0.5,
    }
    spec = {
        "registry": registry,
        "http": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"token_file": str(folder / "token")},
        "limits": {"max_body_bytes": 64 * 1024, "request_timeout_s": 20},
        "ingress": {"num_cpus": 0.1},
        "models": [
            {
                "name": "digits",
                "versions": [
                    {"ref": "digits-mlp:1", "weight": 1},
                    {"ref": "digits-mlp@latest", "weight": 1},
                ],
                "autoscaling": fast_scaling,
                "ray_actor_options": {"num_cpus": 0.25},
            },
            {
                "name": "digits-tight",
                "ref": "digits-mlp:1",
                "batching": {"max_batch_size": 1},
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "autoscaling": {"max_replicas": 1},
                "ray_actor_options": {"num_cpus": 0.25},
            },
        ],
    }
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def serve_config(spec_file: Path) -> dict[str, Any]:
    """What `kiln serve build` prints for the test spec."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["serve", "build", str(spec_file)]) == 0
    return yaml.safe_load(buffer.getvalue())


@pytest.fixture(scope="module")
def server(serve_config: dict[str, Any]) -> Iterator[str]:
    """The application built from the config's import_path and args, on 127.0.0.1."""
    from ray import serve

    from kiln.inference.serve import build_app

    [application] = serve_config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert (module, attr) == ("kiln.inference.serve", "build_app")
    serve.start(http_options=serve_config["http_options"])
    try:
        serve.run(build_app(application["args"]), name=application["name"], route_prefix="/")
        yield f"http://127.0.0.1:{serve_config['http_options']['port']}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def test_rows(digits_dir: Path) -> pa.Table:
    return pq.read_table(sorted((digits_dir / "test").glob("*.parquet"))).slice(0, 24)


def post(url: str, document: Any = None, *, data: bytes | None = None, **kwargs: Any) -> Any:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    if document is not None:
        data = json.dumps(document).encode()
        headers.setdefault("Content-Type", "application/json")
    return requests.post(url, data=data, headers=headers, timeout=TIMEOUT, **kwargs)


def matrix(table: pa.Table) -> dict[str, Any]:
    rows = np.stack([table.column(f).to_numpy() for f in FEATURES], axis=1).astype(np.float32)
    return {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }


def instances(table: pa.Table) -> dict[str, Any]:
    return {"instances": table.select(FEATURES).to_pylist()}


def assert_serving(server: str) -> None:
    """A valid request still answers 200 (after an error)."""
    ok = post(f"{server}/v1/models/digits:predict", {"instances": [dict.fromkeys(FEATURES, 1.0)]})
    assert ok.status_code == 200, ok.text


# ---- protocol ------------------------------------------------------------------------------------


def test_health_and_metadata(server: str) -> None:
    assert requests.get(f"{server}/v2/health/live", timeout=TIMEOUT).json() == {"live": True}
    ready = requests.get(f"{server}/v2/health/ready", timeout=TIMEOUT)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    metadata = requests.get(f"{server}/v2/models/digits", headers=AUTH, timeout=TIMEOUT).json()
    assert metadata["name"] == "digits"
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"][1] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [-1, 10],
    }
    model_ready = requests.get(f"{server}/v2/models/digits/ready", headers=AUTH, timeout=TIMEOUT)
    assert model_ready.json() == {"name": "digits", "ready": True}
    version = requests.get(f"{server}/v2/models/digits/versions/2", headers=AUTH, timeout=TIMEOUT)
    assert version.json()["versions"] == ["2"]
    docs = requests.get(f"{server}/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(f"{server}/openapi.json", timeout=TIMEOUT).json()["paths"]
    assert "/v2/models/{name}/infer" in paths and "/v1/models/{name}:predict" in paths


def test_the_port_is_haproxy_in_front_of_the_replicas(server: str) -> None:
    import psutil

    # kiln's default ingress (http.proxy: auto, set for this session's Ray by tests/conftest.py):
    # HAProxy owns the HTTP port, and the answers come from the ingress replica behind it.
    port = int(server.rsplit(":", 1)[1])
    listeners = [
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listeners and {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}
    assert requests.get(f"{server}/v2/health/live", timeout=TIMEOUT).json() == {"live": True}


def test_oip_predict_and_predictor_agree(server: str, registry: str, test_rows: pa.Table) -> None:
    expected = Predictor(registry, "digits-mlp:2").predict_table(test_rows)
    response = post(
        f"{server}/v2/models/digits/versions/2/infer", {**matrix(test_rows), "id": "q1"}
    )
    assert response.status_code == 200, response.text
    document = response.json()
    assert (document["model_name"], document["model_version"], document["id"]) == (
        "digits",
        "2",
        "q1",
    )
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["prediction"]["datatype"] == "INT64"
    assert outputs["prediction"]["data"] == expected["prediction"].tolist()
    assert outputs["probabilities"]["shape"] == [24, 10]
    oip_probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(24, 10)
    np.testing.assert_allclose(oip_probabilities, expected["probabilities"], atol=1e-6)

    response = post(f"{server}/v1/models/digits/versions/2:predict", instances(test_rows))
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["model_version"] == "2"
    labels = [p["label"] for p in document["predictions"]]
    assert labels == expected["prediction"].tolist()
    friendly = np.asarray(
        [[p["probabilities"][str(k)] for k in range(10)] for p in document["predictions"]]
    )
    np.testing.assert_allclose(friendly, expected["probabilities"], atol=1e-6)
    accuracy = float(np.mean(np.asarray(labels) == test_rows.column("label").to_numpy()))
    assert accuracy > 0.8


def test_binary_tensors(server: str, registry: str, test_rows: pa.Table) -> None:
    """Triton's binary extension, as tritonclient sends it by default."""
    rows = np.stack([test_rows.column(f).to_numpy() for f in FEATURES], axis=1).astype("<f4")
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": rows.nbytes}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    response = post(
        f"{server}/v2/models/digits/versions/2/infer",
        data=header + rows.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    outputs = json.loads(response.content[:length])["outputs"]
    blob = response.content[length:]
    labels = np.frombuffer(blob[: outputs[0]["parameters"]["binary_data_size"]], "<i8")
    expected = Predictor(registry, "digits-mlp:2").predict_table(test_rows)
    assert labels.tolist() == expected["prediction"].tolist()


# ---- auth, limits, errors ------------------------------------------------------------------------


def test_bearer_token_is_required(server: str) -> None:
    url = f"{server}/v2/models/digits/infer"
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = requests.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401
        assert response.json() == {"error": "missing or invalid bearer token"}
        assert TOKEN not in response.text
    assert requests.get(f"{server}/v2/models/digits", timeout=TIMEOUT).status_code == 401
    assert post(url, body).status_code == 200


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/v2/models/digits/infer", b'{"inputs": [', 400, "not valid JSON"),
        ("/v1/models/digits:predict", b'{"instances": [{"px_00": 1', 400, "not valid JSON"),
        (
            "/v1/models/digits:predict",
            {"instances": [{**dict.fromkeys(FEATURES, 0.0), "px_99": 1.0}]},
            400,
            r"instances\[0\]: unknown feature 'px_99'",
        ),
        (
            "/v1/models/digits:predict",
            json.dumps({"instances": [dict.fromkeys(FEATURES, 0.5)]})
            .replace("0.5", "NaN", 1)
            .encode(),
            400,
            r"instances\[0\].px_00: nan is not allowed",
        ),
        (
            "/v2/models/digits/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 64}
                ]
            },
            400,
            "shape holds 128 elements but 'data' has 64",
        ),
        (
            "/v2/models/digits/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0.5] * 64}
                ]
            },
            400,
            "is not an integer, as INT64 needs",
        ),
        (
            "/v2/models/nope/infer",
            {"inputs": []},
            404,
            "unknown model 'nope'; served models: digits",
        ),
        (
            "/v2/models/digits/versions/7/infer",
            {"inputs": []},
            404,
            "has no version '7'; served versions: 1, 2",
        ),
        ("/v1/models/digits/versions/7:predict", {"instances": []}, 404, "has no version '7'"),
    ],
)
def test_bad_requests_answer_4xx_and_the_server_keeps_serving(
    server: str, path: str, payload: Any, status: int, message: str
) -> None:
    if isinstance(payload, bytes):
        response = post(server + path, data=payload)
    else:
        response = post(server + path, payload)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert re.search(message, response.json()["error"]), response.json()
    assert_serving(server)


def test_large_body_is_413(server: str) -> None:
    rows = [dict.fromkeys(FEATURES, 1.0)] * 200
    response = post(f"{server}/v1/models/digits:predict", {"instances": rows})
    assert response.status_code == 413
    assert "exceeds the limit of 65536 bytes" in response.json()["error"]
    assert_serving(server)


def test_unknown_route_uses_the_error_body(server: str) -> None:
    response = requests.get(f"{server}/v2/nothing/here", timeout=TIMEOUT)
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


# ---- canary, several models, overload, health ----------------------------------------------------


def test_canary_split_reports_both_versions(server: str) -> None:
    seen = Counter()
    body = {"instances": [dict.fromkeys(FEATURES, 3.0)]}
    for _ in range(40):
        response = post(f"{server}/v1/models/digits:predict", body)
        assert response.status_code == 200, response.text
        seen[response.json()["model_version"]] += 1
    assert set(seen) == {"1", "2"}, seen
    tight = post(f"{server}/v1/models/digits-tight:predict", body)
    assert tight.json()["model_version"] == "1"


def test_overload_answers_503_fast(server: str) -> None:
    """digits-tight admits 1 request plus 1 queued; a burst gets 503s, and every admitted
    request succeeds."""
    url = f"{server}/v2/models/digits-tight/infer"
    body = {
        "inputs": [{"name": "input", "shape": [64, 64], "datatype": "FP32", "data": [1.0] * 4096}]
    }
    statuses: list[int] = []
    barrier = threading.Barrier(24)

    def send() -> None:
        barrier.wait()
        statuses.append(post(url, body).status_code)

    threads = [threading.Thread(target=send) for _ in range(24)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    elapsed = time.monotonic() - started
    counts = Counter(statuses)
    assert set(counts) <= {200, 503}, counts
    assert counts[503] >= 1 and counts[200] >= 1, counts
    assert elapsed < 15
    assert_serving(server)


def test_metrics_per_model_and_version(server: str) -> None:
    """kiln's metrics appear on Ray's Prometheus endpoint beside Serve's own."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [
        r'ray_kiln_requests_total\{[^}]*code="200"[^}]*model="digits"[^}]*version="2"',
        r'ray_kiln_request_errors_total\{[^}]*code="400"',
        r'ray_kiln_request_latency_ms_bucket\{[^}]*model="digits"',
        r'ray_kiln_batch_size_count\{[^}]*model="digits"',
        r"ray_serve_num_http_requests_total",
    ]
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).text
        if all(re.search(pattern, text) for pattern in wanted):
            break
        time.sleep(1)
    missing = [pattern for pattern in wanted if not re.search(pattern, text)]
    assert not missing, missing


def test_health_check_fails_when_the_model_cannot_predict(registry: str) -> None:
    from kiln.inference.serve import ModelServer

    replica = ModelServer(registry, "digits-mlp:2", "digits", "cpu", 4, 0.0)
    replica.check_health()
    with torch.no_grad():
        for parameter in replica.predictor.module.parameters():
            parameter.fill_(math.nan)
    with pytest.raises(RuntimeError, match="digits-mlp:2: the probe row predicts a non-finite"):
        replica.check_health()


def test_a_short_forward_pass_runs_on_the_event_loop_a_long_one_in_a_thread(
    registry: str, test_rows: pa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.inference import serve as serve_module
    from kiln.inference.serve import ModelServer

    replica = ModelServer(registry, "digits-mlp:2", "digits", "cpu", 4, 0.0)
    seen: list[tuple[float, str]] = []  # (the average before the batch, the thread it ran on)
    run_batch = replica._run_batch

    def spy(tables: list[pa.Table]) -> list[dict[str, Any]]:
        seen.append((replica._forward_s, threading.current_thread().name))
        return run_batch(tables)

    monkeypatch.setattr(replica, "_run_batch", spy)
    rows = test_rows.select(list(replica.predictor.features)).slice(0, 3)

    async def requests(n: int) -> list[dict[str, Any]]:
        # What each batch of Serve's batch queue awaits (the queue needs a Serve replica).
        return [(await replica._forward([rows]))[0] for _ in range(n)]

    answers = asyncio.run(requests(4))
    expected = replica.predictor.predict_table(rows)["probabilities"]
    assert all(np.allclose(a["probabilities"], expected, atol=1e-6) for a in answers)
    loop_thread = threading.current_thread().name
    # Unknown cost at first: a thread. Then the measured average decides (on a busy machine
    # even this tiny MLP's first passes can average over the limit, so the rule is checked).
    assert math.isinf(seen[0][0]) and seen[0][1] != loop_thread
    limit = serve_module._INLINE_FORWARD_S
    for average, thread in seen[1:]:
        assert (thread == loop_thread) == (average < limit), (average, thread)
    assert 0 < replica._forward_s < 0.1  # a moving average of what the passes took
    replica._forward_s = limit / 2  # as measured for a small model: on the event loop
    asyncio.run(requests(1))
    assert seen[-1][1] == loop_thread
    monkeypatch.setattr(serve_module, "_INLINE_FORWARD_S", 0.0)  # as if the model were large
    asyncio.run(requests(2))
    assert all(thread != loop_thread for _, thread in seen[-2:])


# ---- the Serve config ----------------------------------------------------------------------------


def test_serve_build_writes_a_deployable_config(
    serve_config: dict[str, Any], registry: str
) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)
    [application] = serve_config["applications"]
    assert application["import_path"] == "kiln.inference.serve:build_app"
    assert application["args"]["registry"] == registry
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == {
        "kiln-ingress",
        "digits/digits-mlp:1",
        "digits/digits-mlp@latest",
        "digits-tight/digits-mlp:1",
    }
    scaling = deployments["digits/digits-mlp@latest"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["upscale_delay_s"]) == (
        1,
        2,
        1,
    )
    assert deployments["digits-tight/digits-mlp:1"]["max_queued_requests"] == 1
    assert TOKEN not in yaml.safe_dump(serve_config)


def test_one_model_app_runs_the_model_inside_the_ingress(
    server: str, registry: str, test_rows: pa.Table
) -> None:
    """One model with one version: no separate model deployment (one hop less per request),
    and the same answers, readiness and health checks."""
    from ray import serve

    from kiln.inference.serve import build_app, serve_config
    from kiln.inference.serve_spec import validate_serve_spec

    spec = {
        "name": "solo",
        "route_prefix": "/solo",
        "registry": registry,
        "models": [{"ref": "digits-mlp:2", "ray_actor_options": {"num_cpus": 0.1}}],
    }
    [application] = serve_config(validate_serve_spec(spec))["applications"]
    assert [d["name"] for d in application["deployments"]] == ["kiln-ingress"]
    serve.run(build_app(spec), name="solo", route_prefix="/solo")
    try:
        deployments = serve.status().applications["solo"].deployments
        assert set(deployments) == {"kiln-ingress"}
        ready = requests.get(f"{server}/solo/v2/health/ready", timeout=TIMEOUT)
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        response = post(f"{server}/solo/v2/models/digits-mlp/infer", matrix(test_rows))
        assert response.status_code == 200, response.text
        [prediction] = [o for o in response.json()["outputs"] if o["name"] == "prediction"]
        expected = Predictor(registry, "digits-mlp:2").predict_table(test_rows)
        assert prediction["data"] == expected["prediction"].tolist()
        bad = post(f"{server}/solo/v1/models/digits-mlp:predict", {"instances": [{"px_00": 1}]})
        assert bad.status_code == 400, bad.text
    finally:
        serve.delete("solo")


# ---- autoscaling under load ----------------------------------------------------------------------


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["kiln"].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.mark.slow
def test_autoscaling_up_and_down_without_failures(server: str, test_rows: pa.Table) -> None:
    deployment, url = "digits/digits-mlp@latest", f"{server}/v2/models/digits/versions/2/infer"
    body = matrix(test_rows.slice(0, 8))
    assert running_replicas(deployment) == 1
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(url, json=body, headers=AUTH, timeout=TIMEOUT)
                statuses[response.status_code] += 1

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    peak, deadline = 1, time.monotonic() + 20
    try:
        while time.monotonic() < deadline and peak < 2:
            time.sleep(0.5)
            peak = max(peak, running_replicas(deployment))
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert peak == 2
    assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and running_replicas(deployment) > 1:
        time.sleep(0.5)
    assert running_replicas(deployment) == 1


@pytest.mark.slow
def test_killed_replica_recovers_and_no_request_hangs(server: str, test_rows: pa.Table) -> None:
    """SIGKILL a model replica under load: Serve replaces it, every request ends (an answer or
    an error) within the request timeout, and requests succeed again afterwards."""
    import psutil

    deployment, url = "digits/digits-mlp@latest", f"{server}/v2/models/digits/versions/2/infer"
    body = matrix(test_rows.slice(0, 4))
    request_timeout_s = 20  # limits.request_timeout_s of the test spec
    durations: list[float] = []
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    response = session.post(url, json=body, headers=AUTH, timeout=TIMEOUT)
                    statuses[response.status_code] += 1
                except requests.RequestException:
                    statuses[0] += 1
                durations.append(time.monotonic() - start)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        victims = [
            proc
            for proc in psutil.process_iter(["cmdline"])
            if "ServeReplica:kiln:digits/digits-mlp@latest" in " ".join(proc.info["cmdline"] or [])
            and _in_this_ray_session(proc)
        ]
        assert victims, "no replica process found"
        victims[0].kill()
        deadline = time.monotonic() + 60
        time.sleep(1)
        while time.monotonic() < deadline and running_replicas(deployment) < 1:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert running_replicas(deployment) >= 1
    assert max(durations) <= request_timeout_s + 5, max(durations)
    assert statuses[200] > 0, statuses
    after = post(url, body)
    assert after.status_code == 200, after.text


def _in_this_ray_session(proc: Any) -> bool:
    """Whether a worker process belongs to this test session's Ray (its raylet names our temp
    dir), so a concurrent Ray on the machine is never touched."""
    import psutil
    import ray

    temp_dir = ray._private.worker._global_node.get_temp_dir_path()
    try:
        return temp_dir in " ".join(proc.parent().cmdline())
    except (OSError, psutil.Error):  # a process that vanished is not ours to kill
        return False


# ---- replica and ingress internals with stand-in handles ----------------------------------------


def test_a_bad_request_in_a_batch_does_not_fail_the_others(
    registry: str, test_rows: pa.Table
) -> None:
    from kiln.errors import DataError
    from kiln.inference.serve import ModelServer

    replica = ModelServer(registry, "digits-mlp:2", "digits", "cpu", 4, 0.0)
    predict = replica.predictor.predict_table

    def strict(table: pa.Table) -> dict[str, np.ndarray]:
        if -1.0 in table.column("px_00").to_pylist():
            raise DataError("rows [0]: px_00 is -1")
        return predict(table)

    replica.predictor.predict_table = strict  # type: ignore[method-assign]
    # The ingress hands replicas float64 feature columns.
    rows = pa.table({f: test_rows.column(f).cast(pa.float64()) for f in FEATURES})
    good, bad = rows.slice(0, 3), rows.slice(3, 2)
    bad = bad.set_column(0, "px_00", pa.array([-1.0, 0.0]))
    results = replica._run_batch([good, bad, good.slice(1, 1)])
    assert results[1] == {"error": "rows [0]: px_00 is -1"}
    np.testing.assert_array_equal(results[0]["prediction"], predict(good)["prediction"])
    np.testing.assert_allclose(
        results[2]["probabilities"], predict(good.slice(1, 1))["probabilities"], atol=1e-6
    )


class _Response:
    def __init__(self, outcome: Any) -> None:
        self.outcome, self.cancelled = outcome, False

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if isinstance(self.outcome, float):
            await asyncio.sleep(self.outcome)
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, outcome: Any) -> None:
        self.outcome, self.responses = outcome, []

    def remote(self, *_args: Any) -> _Response:
        self.responses.append(_Response(self.outcome))
        return self.responses[-1]


class _Handle:
    def __init__(self, outcome: Any) -> None:
        self.predict, self.ping = _Method(outcome), _Method("digits-mlp:2")


def ingress_with(outcome: Any, timeout_s: float = 0.3) -> tuple[Any, Any]:
    from kiln.inference.serve import Ingress

    schema = {
        "task": "classification",
        "features": FEATURES,
        "categorical": [],
        "classes": [*range(10)],
    }
    handle = _Handle(outcome)
    spec = {"models": [{"ref": "digits-mlp:2"}], "limits": {"request_timeout_s": timeout_s}}
    route = {
        "name": "digits-mlp",
        "variants": [{"ref": "digits-mlp:2", "weight": 1, "schema": schema, "handle": handle}],
    }
    ingress = Ingress(spec, [route])
    return ingress, ingress.models["digits-mlp"].variants[0]


def test_slow_model_answers_504_and_the_call_is_cancelled() -> None:
    from kiln.inference.oip import RequestError

    ingress, variant = ingress_with(5.0)
    with pytest.raises(RequestError, match=r"digits-mlp:2: no answer within 0.3 s") as info:
        asyncio.run(ingress._call(variant, pa.table({"px_00": [1.0]})))
    assert info.value.status == 504
    assert variant.handle.predict.responses[0].cancelled


def test_backpressure_answers_503_with_retry_after() -> None:
    from ray.serve.exceptions import BackPressureError

    from kiln.inference.oip import RequestError

    ingress, variant = ingress_with(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    with pytest.raises(RequestError, match="digits-mlp:2 is overloaded; retry later") as info:
        asyncio.run(ingress._call(variant, pa.table({"px_00": [1.0]})))
    assert (info.value.status, info.value.headers) == (503, {"retry-after": "1"})


def test_rows_the_model_refuses_answer_400() -> None:
    from kiln.inference.oip import RequestError

    ingress, variant = ingress_with({"error": "rows [2]: missing feature values"})
    with pytest.raises(RequestError, match=r"rows \[2\]: missing feature values") as info:
        asyncio.run(ingress._call(variant, pa.table({"px_00": [1.0]})))
    assert info.value.status == 400
