"""Online serving overhead: kiln's Ray Serve app against the same Predictor behind bare FastAPI.

    .venv/bin/python benchmarks/serve.py                 # all figures, about 2 minutes
    .venv/bin/python benchmarks/serve.py --requests 500 --duration 5 --clients 16

Everything runs on 127.0.0.1. The request is the same JSON body for both servers, one row
`{"instances": [{feature: value, ...}]}`, and both decode it and encode the answer with kiln's own
`oip.decode_instances` / `oip.encode_predictions`, so the ratio is what Ray Serve (its ingress,
the ingress deployment, `@serve.batch`) and kiln's request handling (auth, limits, validation,
metrics, drift counts) add on top of the same work. The first line says whether the model has
a training profile (every model `kiln train` registers has one): kiln then also counts each
request's inputs for drift, which the bare server does not.

1. Latency: one client, keep-alive connection, `--requests` sequential requests after a warm-up;
   p50 and p99. Goals: kiln/bare p50 <= 1.15, p99 <= 1.3.
2. Max QPS: `--clients` threads, each with its own keep-alive connection, for `--duration` s.
3. Batching: kiln QPS at `--clients` with `max_batch_size` 32 against `max_batch_size` 1.
4. Ray Serve's floor: the latency of a FastAPI Serve app that answers a constant (no model, no
   kiln code), for context: what any Ray Serve application pays for its ingress here.

The bare server is `uvicorn` in a subprocess (this file with `--bare-port`) serving POST /predict;
it runs before Ray starts, so it does not share the CPUs with an idle Ray. The kiln app is
`build_app` with one model replica (no autoscaling), started in-process with `serve.run` behind
the ingress `kiln serve` would use (`--proxy`, `--throughput-optimized`: kiln's `http.proxy` and
`http.throughput_optimized`, exported before this process starts Ray, as `kiln serve` does).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the string annotation here

REPO = Path(__file__).resolve().parent.parent
P50_GOAL, P99_GOAL = 1.15, 1.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the bare server (subprocess) ----------------------------------------------------------------


def run_bare(registry: str, ref: str, port: int, threads: int) -> None:
    """FastAPI + uvicorn serving POST /predict with a Predictor (runs until killed)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from kiln.inference import oip
    from kiln.inference.predictor import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor(registry, ref)
    info = oip.ModelInfo.from_schema("bare", predictor.ref, predictor.schema)
    app = FastAPI()

    def score(body: bytes) -> bytes:
        result = predictor.predict_table(oip.decode_instances(body, info))
        return oip.dumps(oip.encode_predictions(info, result))

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        import asyncio

        content = await asyncio.to_thread(score, await request.body())
        return Response(content, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- clients -------------------------------------------------------------------------------------


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> None:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST {path}: {response.status} {data[:200]!r}")


def wait_ready(port: int, path: str, body: bytes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            _post(conn, path, body)
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            conn.close()


def latency(port: int, path: str, body: bytes, n: int, warmup: int) -> dict[str, float]:
    """p50/p99 in ms of `n` sequential requests over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(warmup):
            _post(conn, path, body)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            _post(conn, path, body)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50": statistics.median(times), "p99": cuts[98]}


def throughput(port: int, path: str, body: bytes, clients: int, duration: float) -> float:
    """Requests/s answered 200 by `clients` threads in a closed loop for `duration` s."""
    counts = [0] * clients
    errors: list[BaseException] = []
    start_line = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            start_line.wait()
            while time.perf_counter() < stop_at[0]:
                _post(conn, path, body)
                counts[index] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + duration
    start = time.perf_counter()
    start_line.wait()
    for thread in threads:
        thread.join(duration + 60)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]!r}")
    return sum(counts) / elapsed


# ---- the runs ------------------------------------------------------------------------------------


def request_body(data: str, features: list[str]) -> bytes:
    import pyarrow.parquet as pq

    files = sorted(Path(data).glob("*.parquet"))
    row = pq.read_table(files[0], columns=features).slice(0, 1).to_pylist()[0]
    return json.dumps({"instances": [row]}).encode()


def measure_bare(args: argparse.Namespace, body: bytes) -> dict[str, float]:
    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--bare-port",
        str(port),
        "--registry",
        args.registry,
        "--ref",
        args.ref,
        "--threads",
        str(args.threads),
    ]
    process = subprocess.Popen(command, cwd=REPO)
    try:
        wait_ready(port, "/predict", body)
        result = latency(port, "/predict", body, args.requests, args.warmup)
        result["qps"] = throughput(port, "/predict", body, args.clients, args.duration)
        return result
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kiln_spec(args: argparse.Namespace, port: int, batch: int) -> dict[str, Any]:
    return {
        "registry": args.registry,
        "http": {
            "host": "127.0.0.1",
            "port": port,
            "proxy": args.proxy,
            "throughput_optimized": args.throughput_optimized,
        },
        "ingress": {"num_cpus": 0.25},
        "models": [
            {
                "name": "bench",
                "ref": args.ref,
                "batching": {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait},
                "max_ongoing_requests": max(32, args.clients),
                "max_queued_requests": -1,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                "ray_actor_options": {"num_cpus": 0.5},
            }
        ],
    }


def _floor_app() -> Any:
    """A FastAPI Serve deployment that reads the body and answers a constant."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    from ray import serve

    app = FastAPI()

    async def floor(request: Request) -> Response:
        await request.body()
        return Response(b'{"predictions": []}', media_type="application/json")

    # Registered on the app directly: FastAPI resolves the annotation of a module-level function
    # (this module imports Request), which a method of a class built in here would not get.
    app.add_api_route("/floor", floor, methods=["POST"])
    return serve.deployment(
        serve.ingress(app)(type("Floor", (), {})), ray_actor_options={"num_cpus": 0.5}
    )


def serve_floor(port: int, body: bytes, n: int, warmup: int) -> dict[str, float]:
    """Latency of Ray Serve itself: a FastAPI ingress that reads the body and answers a constant,
    no model and no kiln code (what any Serve app pays for its ingress)."""
    from ray import serve

    serve.run(_floor_app().bind(), name="floor", route_prefix="/")
    wait_ready(port, "/floor", body)
    try:
        return latency(port, "/floor", body, n, warmup)
    finally:
        serve.delete("floor")


def measure_kiln(
    args: argparse.Namespace, body: bytes
) -> tuple[dict[str, float], float, dict[str, float]]:
    """Latency and QPS with max_batch_size 32, then QPS with max_batch_size 1, then Serve's own
    floor latency."""
    from kiln.inference.serve_env import apply_serve_environment, describe
    from kiln.inference.serve_spec import validate_serve_spec

    port = free_port()
    # Before Ray is imported and started, as `kiln serve` does: Serve reads these at import.
    print(describe(apply_serve_environment(validate_serve_spec(kiln_spec(args, port, 1)).http)))

    import ray
    from ray import serve

    from kiln.inference.serve import build_app, http_options

    path = "/v1/models/bench:predict"
    temp_dir = tempfile.mkdtemp(prefix="kb-", dir="/tmp")  # short: Ray's socket paths are capped
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}},
        log_to_driver=False,
    )
    try:
        batched_spec = kiln_spec(args, port, 32)
        serve.start(http_options=http_options(validate_serve_spec(batched_spec)))
        serve.run(build_app(batched_spec), name="kiln", route_prefix="/")
        wait_ready(port, path, body)
        result = latency(port, path, body, args.requests, args.warmup)
        result["qps"] = throughput(port, path, body, args.clients, args.duration)
        serve.delete("kiln")
        serve.run(build_app(kiln_spec(args, port, 1)), name="kiln", route_prefix="/")
        wait_ready(port, path, body)
        throughput(port, path, body, args.clients, 1.0)  # warm-up
        unbatched = throughput(port, path, body, args.clients, args.duration)
        serve.delete("kiln")
        return result, unbatched, serve_floor(port, body, args.requests, args.warmup)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _drift_note(registry: str, ref: str) -> str:
    """Whether kiln counts this model's inputs for drift (it does when the model has a training
    profile, as every model `kiln train` registers has; the bare server never does)."""
    from kiln.errors import RegistryError
    from kiln.monitor import PROFILE_FILE
    from kiln.registry import Registry

    store = Registry(registry)
    try:
        store.read_document(store.resolve(ref), PROFILE_FILE)
    except RegistryError:  # no profile: registered by hand, or before kiln kept profiles
        return "no training profile (kiln counts no drift)"
    return "with its training profile (kiln counts every request's inputs for drift)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--registry", default=str(REPO / ".kiln" / "registry"))
    parser.add_argument("--ref", default="digits-mlp@production")
    parser.add_argument(
        "--data", default=str(REPO / "data" / "digits" / "test"), help="parquet rows to send"
    )
    parser.add_argument("--requests", type=int, default=400, help="latency requests (1 client)")
    parser.add_argument("--warmup", type=int, default=50, help="requests before timing")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients for QPS")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per QPS run")
    parser.add_argument("--batch-wait", type=float, default=0.0, help="batch_wait_timeout_s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    parser.add_argument(
        "--proxy", choices=("auto", "haproxy", "ray"), default="auto", help="kiln's http.proxy"
    )
    parser.add_argument(
        "--throughput-optimized",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kiln's http.throughput_optimized",
    )
    parser.add_argument("--bare-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.registry = os.path.abspath(args.registry)
    if args.bare_port:
        run_bare(args.registry, args.ref, args.bare_port, args.threads)
        return 0

    from kiln.inference.predictor import Predictor

    predictor = Predictor(args.registry, args.ref)
    body = request_body(args.data, predictor.features)
    print(f"model: {predictor.ref}, {_drift_note(args.registry, predictor.ref)}")
    started = time.monotonic()
    bare = measure_bare(args, body)
    kiln, unbatched, floor = measure_kiln(args, body)

    header = f"{'kiln (batch 32)':>16}{'bare FastAPI':>14}{'kiln (batch 1)':>16}"
    print(f"\n{'':<22}{header}{'Serve, no model':>17}")
    for key in ("p50", "p99"):
        cells = f"{kiln[key]:>16.2f}{bare[key]:>14.2f}{'':>16}{floor[key]:>17.2f}"
        print(f"{key + ' latency, ms':<22}{cells}")
    qps = f"QPS, {args.clients} clients"
    print(f"{qps:<22}{kiln['qps']:>16.1f}{bare['qps']:>14.1f}{unbatched:>16.1f}")
    print()
    for key, goal in (("p50", P50_GOAL), ("p99", P99_GOAL)):
        print(
            f"{key} latency: kiln {kiln[key]:.1f} ms, bare {bare[key]:.1f} ms, "
            f"ratio {kiln[key] / bare[key]:.2f} (goal <= {goal})"
        )
    print(
        f"max QPS ({args.clients} clients): kiln {kiln['qps']:.1f}, bare {bare['qps']:.1f}, "
        f"ratio {kiln['qps'] / bare['qps']:.2f}"
    )
    print(
        f"batching ({args.clients} clients): batch 32 {kiln['qps']:.1f} QPS, batch 1 "
        f"{unbatched:.1f} QPS, ratio {kiln['qps'] / unbatched:.2f}"
    )
    print(
        f"Ray Serve floor (FastAPI ingress answering a constant): p50 {floor['p50']:.1f} ms = "
        f"{floor['p50'] / bare['p50']:.2f}x bare; kiln above it: "
        f"{kiln['p50'] - floor['p50']:.1f} ms"
    )
    print(f"(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
