"""`kiln tune` and `kiln plan` as a user types them: an impossible plan refused in seconds, and a
sweep whose driver is killed mid-run resumed with every finished trial kept."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KILN = str(Path(sys.executable).parent / "kiln")

pytestmark = pytest.mark.e2e
# A row of the live trial table of a finished trial: "<id>_00001  ...  finished  ..."
FINISHED_ROW = re.compile(r"^(\w+_\d{5})\s.*\sfinished\s.*$", re.MULTILINE)


def env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN", secrets.token_hex(32))}


@pytest.fixture()
def workdir(tmp_path: Path, digits_dir: Path) -> Path:
    """The example sweep spec, shrunk to a 3-point grid of 2-epoch FIFO trials."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir, target_is_directory=True)
    spec = yaml.safe_load((REPO / "jobs" / "configs" / "digits-sweep.yaml").read_text())
    spec["train"]["epochs"] = 2
    spec["tune"] |= {
        "num_samples": 1,
        "space": {"train.lr": {"sample": "grid", "values": [0.003, 0.01, 0.03]}},
        "scheduler": {"kind": "fifo"},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def kiln(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KILN, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


def test_unschedulable_plan_is_refused_in_seconds(workdir: Path) -> None:
    start = time.monotonic()
    result = kiln("tune", "sweep.yaml", "train.resources_per_worker={CPU: 1000}", cwd=workdir)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(
        r"kiln: error: train: 1 workers x 1000 CPU \+ 1 CPU for Ray Data .* but the cluster has",
        result.stderr,
    )
    assert "Traceback" not in result.stderr
    assert elapsed < 10, f"refusal took {elapsed:.1f} s"

    planned = kiln("plan", "sweep.yaml", "train.use_gpu=true", cwd=workdir)
    if planned.returncode == 2:  # no GPU here: the message says how many are needed
        assert "with use_gpu needs 1 GPUs; the cluster has" in planned.stderr
    fits = kiln("plan", "sweep.yaml", cwd=workdir)
    assert fits.returncode == 0 and fits.stdout.strip().endswith("plan ok"), fits.stderr


@pytest.mark.slow
def test_killed_sweep_resumes_keeping_finished_trials(workdir: Path) -> None:
    log = (workdir / "first.err").open("w")
    driver = subprocess.Popen(
        [KILN, "tune", "sweep.yaml"],
        cwd=workdir,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    try:
        finished, shown = _wait_for_finished_trial(workdir / "first.err", driver, timeout=300)
        os.kill(driver.pid, signal.SIGTERM)  # an outside kill, mid-sweep
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    sweep = next((workdir / ".kiln" / "runs").glob("digits-mlp-sweep-*"))
    assert not (sweep / "results.parquet").exists()  # it really was interrupted
    kept = sweep / "runs" / finished
    checkpoints = sorted(p.name for p in kept.glob("checkpoint_*"))
    assert checkpoints

    resumed = kiln("tune", "--resume", str(sweep), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "registered digits-mlp:1" in resumed.stdout
    rows = {row["trial"]: row for row in pq.read_table(sweep / "results.parquet").to_pylist()}
    assert len(rows) == 3
    assert all(row["status"] == "completed" and row["epochs"] == 2 for row in rows.values())
    # progress, as piped output shows it: every trial counted, the one finished earlier too
    done = r"^\[kiln\] tuning: done, 3/3 trials in \d+:\d\d \([\d.,]+ trials/(s|min)\)$"
    assert re.search(done, resumed.stderr, re.MULTILINE), resumed.stderr[-3000:]
    # the trial that finished before the kill was kept, not trained again, with its metric
    assert sorted(p.name for p in kept.glob("checkpoint_*")) == checkpoints
    assert f"{rows[finished]['val_accuracy']:.4g}" == shown

    # tracking: the resumed sweep finished its own run, one trial run per trial under it
    listed = kiln("runs", "list", "--kind", "tune", "--json", cwd=workdir)
    (sweep_run,) = json.loads(listed.stdout)
    assert sweep_run["status"] == "FINISHED" and sweep_run["model"] == "digits-mlp:1"
    shown = json.loads(kiln("runs", "show", sweep_run["run_id"], "--json", cwd=workdir).stdout)
    trials = {child["name"]: child for child in shown["children"]}
    assert sorted(trials) == sorted(rows)
    assert all(child["status"] == "FINISHED" for child in trials.values())
    best = max(rows.values(), key=lambda row: row["val_accuracy"])
    assert shown["tags"]["kiln.best_trial"] == best["trial"]
    assert trials[finished]["last_metrics"]["val_accuracy"] == pytest.approx(
        rows[finished]["val_accuracy"]
    )


def _wait_for_finished_trial(
    log: Path, driver: subprocess.Popen[bytes], timeout: float
) -> tuple[str, str]:
    """(trial id, val_accuracy as the live table showed it) of the first finished trial."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = FINISHED_ROW.search(log.read_text())
        if match:
            # columns: trial, train.lr, status, epochs, val_accuracy, last_val_accuracy
            return match.group(1), match.group(0).split()[4]
        assert driver.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError("no trial finished in time:\n" + log.read_text()[-3000:])
