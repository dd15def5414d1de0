"""A local 3-node cluster and kiln jobs on it, as a user types it.

One cluster bring-up covers the whole story (each step needs the one before):
`cluster/local.sh up --workers 2` -> a submission without the token is refused -> `kiln submit
--follow` trains digits with 2 workers on SPREAD (SUCCEEDED, the workers on different nodes, the
model registered in the project's storage) -> `kiln submit --kind score` scores with it ->
`kiln jobs stop` stops a running job -> `cluster/local.sh down` leaves no Ray process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "cluster" / "local.sh"
KILN = str(Path(sys.executable).parent / "kiln")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = """\
name: digits-mlp
data: {train: data/digits/train, validation: data/digits/test, label: label}
model: {hidden_sizes: [32]}
train: {epochs: 1, batch_size: 64, lr: 0.01, num_workers: 2, placement: SPREAD}
score: {input: data/digits/test, output: out/scores}
"""


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ports() -> tuple[int, int]:
    """A GCS port and a dashboard port whose neighbours local.sh uses (+1000..+1003) are free;
    all outside Ray's worker port range (10002-19999)."""
    for port in range(23000 + os.getpid() % 2000 * 3, 29000, 7):
        dashboard = port + 3000
        if all(_free(p) for p in (port, dashboard, *range(port + 1000, port + 1004))):
            return port, dashboard
    raise RuntimeError("no free ports for the test cluster")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "KILN_CLUSTER_DIR"):
        env.pop(name, None)  # the token comes from the cluster's own file
    for name in [n for n in env if n.startswith("RAY_SERVE_")]:
        env.pop(name)  # a user's shell: not the test session's Serve switches (tests/conftest.py)
    return env


def _run(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _our_processes(temp_root: str) -> str:
    return subprocess.run(["pgrep", "-af", temp_root], capture_output=True, text=True).stdout


@pytest.fixture()
def project(tmp_path: Path, digits_dir: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir, target_is_directory=True)
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def test_local_cluster_submit_follow_score_stop_and_down(project: Path) -> None:
    env = _env()
    port, dashboard = _ports()
    address = f"http://127.0.0.1:{dashboard}"
    up = _run(
        str(LOCAL_SH), "up", "--workers", "2", "--port", str(port), "--dashboard-port",
        str(dashboard), cwd=project, env=env, timeout=240,
    )  # fmt: skip
    temp_root = (project / ".kiln" / "cluster" / "temp_root").read_text().strip()
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "worker-2 up" in up.stdout and "RAY_AUTH_TOKEN_PATH=" in up.stdout
        status = _run(str(LOCAL_SH), "status", cwd=project, env=env, timeout=60)
        assert "3 nodes alive" in status.stdout, status.stdout + status.stderr
        _check_refused_without_token(project, env, address)
        _check_train_and_score(project, env, address)
        _check_stop(project, env, address)
    finally:
        down = _run(str(LOCAL_SH), "down", cwd=project, env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _our_processes(temp_root) == ""


def _check_refused_without_token(project: Path, env: dict[str, str], address: str) -> None:
    elsewhere = project / "elsewhere"  # no .kiln/cluster/auth_token here
    elsewhere.mkdir()
    refused = _run(
        KILN, "submit", str(project / "spec.yaml"), "--address", address, cwd=elsewhere, env=env
    )
    assert refused.returncode == 2, refused.stderr
    assert "requires an auth token (HTTP 401)" in refused.stderr
    assert "Traceback" not in refused.stderr
    wrong = _run(KILN, "jobs", "list", "--address", address, cwd=project,
                 env={**env, "RAY_AUTH_TOKEN": "not-the-token"})  # fmt: skip
    assert wrong.returncode == 2 and "rejected the auth token" in wrong.stderr


def _check_train_and_score(project: Path, env: dict[str, str], address: str) -> None:
    started = time.monotonic()
    trained = _run(KILN, "submit", "spec.yaml", "--address", address, "--follow",
                   cwd=project, env=env, timeout=420)  # fmt: skip
    print(f"train job: {time.monotonic() - started:.0f} s")
    assert trained.returncode == 0, trained.stdout[-4000:] + trained.stderr[-2000:]
    assert "SUCCEEDED" in trained.stdout.splitlines()[-1]
    version = project / ".kiln" / "registry" / "digits-mlp" / "1"
    assert (version / "model.safetensors").is_file()  # in the project's storage, not the job's
    metrics = json.loads((version / "metrics.json").read_text())
    nodes = metrics["best"]["worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1], nodes
    assert f"nodes {metrics['best']['worker_nodes']}" in trained.stdout  # in the job's log
    job_id = trained.stdout.splitlines()[0]
    logs = _run(KILN, "jobs", "logs", job_id, "--address", address, cwd=project, env=env)
    assert "registered digits-mlp:1" in logs.stdout, logs.stderr

    # Scoring ships kiln as a wheel, installed with --no-deps into the job's virtualenv.

    scored = _run(KILN, "submit", "spec.yaml", "score.model=digits-mlp:1", "--kind", "score",
                  "--package", "wheel", "--address", address, "--follow",
                  cwd=project, env=env, timeout=300)  # fmt: skip
    assert scored.returncode == 0, scored.stdout[-4000:] + scored.stderr[-2000:]
    summary = json.loads((project / "out" / "scores" / "_SUCCESS").read_text())
    assert summary["rows_in"] == summary["rows_out"] > 0


def _check_stop(project: Path, env: dict[str, str], address: str) -> None:
    submitted = _run(KILN, "submit", "spec.yaml", "train.epochs=200", "--address", address,
                     cwd=project, env=env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = _run(KILN, "jobs", "status", job_id, "--address", address, cwd=project, env=env)
        if "status:     RUNNING" in status.stdout:
            break
        time.sleep(2)
    assert "RUNNING" in status.stdout, status.stdout + status.stderr
    stopped = _run(KILN, "jobs", "stop", job_id, "--address", address, cwd=project, env=env)
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stdout, stopped.stderr
    listed = _run(KILN, "jobs", "list", "--json", "--address", address, cwd=project, env=env)
    statuses = {row["job_id"]: row["status"] for row in json.loads(listed.stdout)}
    assert statuses[job_id] == "STOPPED"
    assert sorted(statuses.values()) == ["STOPPED", "SUCCEEDED", "SUCCEEDED"]
