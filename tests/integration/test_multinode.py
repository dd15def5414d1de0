"""Multi-node training: 2 workers on SPREAD land on different nodes of a 3-node cluster.

The cluster (`ray.cluster_utils.Cluster`, head with 0 CPUs + 2 x 1 CPU) runs in a helper process,
because this pytest process already holds a local Ray (the `ray_session` fixture).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("multinode_train.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _run_helper(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen(
        [sys.executable, str(HELPER), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the helper shuts its cluster down first
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"multi-node helper timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_spread_places_two_workers_on_two_nodes(digits_dir: Path, tmp_path: Path) -> None:
    done = _run_helper(str(digits_dir), str(tmp_path), timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    ranks = result["worker_nodes"]
    assert len(ranks) == 2
    assert len(set(ranks)) == 2, f"both workers ran on one node: {ranks}"
    assert set(ranks) == set(result["cpu_nodes"])  # the 0-CPU head ran none of them
    assert result["model"] == "digits-multinode:1"
    assert Path(result["model_path"], "model.safetensors").is_file()
    assert result["val_accuracy"] > 0.3  # learned something (chance: 0.1)
