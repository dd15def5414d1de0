"""The `kiln` command as a user types it, in a subprocess: errors first, then the lifecycle."""

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
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kiln.tracking.tensorboard import read_scalars

REPO = Path(__file__).resolve().parents[2]
KILN = [str(Path(sys.executable).parent / "kiln")]

pytestmark = pytest.mark.e2e


def kiln(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN", secrets.token_hex(32))}
    return subprocess.run(
        [*KILN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture()
def workdir(tmp_path: Path, digits_dir: Path) -> Path:
    """A project folder with the example spec and the digits data where the spec expects it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir, target_is_directory=True)
    spec = yaml.safe_load((REPO / "jobs" / "configs" / "digits-mlp.yaml").read_text())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def registered_versions(workdir: Path) -> list[Path]:
    return sorted((workdir / ".kiln" / "registry").glob("*/[0-9]*/manifest.json"))


def assert_user_error(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in result.stderr


def check_tracked_train_run(
    workdir: Path, *, epochs: int, model: str, best: dict[str, float] | None = None
) -> dict[str, Any]:
    """`kiln runs list`/`show` find the one train run: FINISHED, every epoch's metrics with the
    epoch as step, the registered version as `kiln.model`, the report among its artefacts."""
    listing = kiln("runs", "list", "--kind", "train", cwd=workdir)
    assert listing.returncode == 0, listing.stderr[-2000:]
    header, *rows = listing.stdout.splitlines()
    columns = ["id", "kind", "name", "status", "started", "duration", "metric", "model"]
    assert header.split() == columns
    assert len(rows) == 1, listing.stdout
    run_id, kind, name, status = rows[0].split()[:4]
    assert (kind, name, status, rows[0].split()[-1]) == ("train", "digits-mlp", "FINISHED", model)
    shown = kiln("runs", "show", run_id, "--json", cwd=workdir)
    assert shown.returncode == 0, shown.stderr[-2000:]
    run = json.loads(shown.stdout)
    assert run["tags"]["kiln.model"] == model and run["status"] == "FINISHED"
    for metric in ("train_loss", "val_loss", "val_accuracy"):
        assert [step for step, _ in run["metrics"][metric]] == list(range(1, epochs + 1))
    assert run["params"]["train.epochs"] == str(epochs)
    if best is not None:
        tracked = run["metrics"]["best_val_accuracy"][-1][1]
        assert round(tracked, 4) == best["val_accuracy"]
    assert "report.html" in run["artifacts"], run["artifacts"]
    text = kiln("runs", "show", run_id[:6], cwd=workdir).stdout
    assert f"model: {model}" in text and re.search(rf"^  {epochs}\s+[\d.]+", text, re.MULTILINE)
    return run


def _copy_digits(workdir: Path, name: str) -> Path:
    target = workdir / name
    target.mkdir()
    for part in sorted((workdir / "data" / "digits" / "train").glob("*.parquet")):
        (target / part.name).write_bytes(part.read_bytes())
    return target


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (["train.epoch=3"], r"train\.epoch: unknown key"),
        (["train.epochs=many"], r"train\.epochs: .*integer"),
        (["data.label=digit"], r"label column 'digit' not found in .*part-00000\.parquet"),
        (["train.deepspeed.zero_stage=4"], r"train\.deepspeed\.zero_stage"),
    ],
)
def test_bad_spec_is_one_line_exit_2(workdir: Path, override: list[str], pattern: str) -> None:
    assert_user_error(kiln("train", "spec.yaml", *override, cwd=workdir), pattern)
    assert not registered_versions(workdir)


def test_empty_and_corrupt_parquet(workdir: Path) -> None:
    empty = _copy_digits(workdir, "empty")
    schema = pq.read_schema(next(empty.glob("*.parquet")))
    for part in empty.glob("*.parquet"):
        pq.write_table(pa.Table.from_pylist([], schema=schema), part)
    result = kiln("train", "spec.yaml", f"data.train={empty}", cwd=workdir)
    assert_user_error(result, r"empty")

    corrupt = _copy_digits(workdir, "corrupt")
    victim = sorted(corrupt.glob("*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = kiln("train", "spec.yaml", f"data.train={corrupt}", cwd=workdir)
    assert_user_error(result, rf"{victim.name} is not a readable parquet file")
    assert not registered_versions(workdir)


def test_validate_and_schema(workdir: Path) -> None:
    result = kiln("validate", "spec.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "train: 4 files, 1437 rows, 64 features" in result.stdout
    schema = json.loads(kiln("schema", cwd=workdir).stdout)
    assert "train" in schema["properties"] and schema["additionalProperties"] is False


@pytest.mark.slow
def test_train_register_promote_verify(workdir: Path) -> None:
    result = kiln(
        "train",
        "spec.yaml",
        "train.epochs=4",
        "train.deepspeed.zero_stage=3",
        "tracking.tensorboard=true",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered digits-mlp:1" in result.stdout
    metrics = json.loads(result.stdout.split("metrics: ", 1)[1].splitlines()[0])
    assert metrics["val_accuracy"] >= 0.9
    step_line = r"epoch \d/4 step (\d+)/(\d+) loss [\d.]+ lr [\d.e+-]+ samples/s \d+ eta \d+:\d\d"
    steps = [(int(a), int(b)) for a, b in re.findall(step_line, result.stderr)]
    assert steps and all(done <= total == steps[0][1] for done, total in steps), result.stderr
    run = check_tracked_train_run(workdir, epochs=4, model="digits-mlp:1", best=metrics)
    scalars = read_scalars(Path(run["tags"]["kiln.run_dir"]) / "tensorboard")
    assert [step for step, _ in scalars["val_accuracy"]] == [1, 2, 3, 4]
    assert scalars["val_accuracy"][-1][1] == pytest.approx(run["metrics"]["val_accuracy"][-1][1])

    listing = kiln("models", "list", cwd=workdir)
    assert "digits-mlp:1" in listing.stdout and "latest" in listing.stdout
    promoted = kiln("models", "promote", "digits-mlp:1", "production", cwd=workdir)
    assert promoted.returncode == 0 and "digits-mlp@production -> digits-mlp:1" in promoted.stdout
    shown = json.loads(kiln("models", "show", "digits-mlp@production", cwd=workdir).stdout)
    assert shown["documents"]["lineage.json"]["spec_hash"]
    assert "production" in shown["aliases"]
    assert kiln("models", "verify", "digits-mlp@latest", cwd=workdir).returncode == 0

    weights = registered_versions(workdir)[0].parent / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    assert_user_error(
        kiln("models", "verify", "digits-mlp:1", cwd=workdir), r"model\.safetensors.*verification"
    )


@pytest.mark.slow
def test_interrupted_run_resumes(workdir: Path) -> None:
    epochs_total = 6
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = subprocess.Popen(
        [
            *KILN,
            "train",
            "spec.yaml",
            f"train.epochs={epochs_total}",
            "train.num_workers=1",
            "train.batch_size=32",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runs = workdir / ".kiln" / "runs"
    deadline = time.monotonic() + 300
    while len(list(runs.glob("*/checkpoint_*"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-2000:]
    assert not registered_versions(workdir)

    (run_dir,) = runs.iterdir()
    # As if interrupted before Ray Train recorded any checkpoint (its controller was still busy
    # with the first reports): kiln resumes from the newest checkpoint on disk. Ray Train's own
    # record is tested by test_killed_worker_resumes_from_last_checkpoint.
    (run_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    result = kiln("train", "--resume", str(run_dir), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = re.search(r"resumed from checkpoint (\S+) after epoch (\d+)", result.stderr)
    assert resumed, result.stderr[-3000:]
    assert Path(resumed.group(1)).parent == run_dir
    assert 2 <= int(resumed.group(2)) <= epochs_total  # at least the two seen before SIGINT
    assert "registered digits-mlp:1" in result.stdout
    # the resumed training continued the interrupted run's tracked run: one run, every epoch
    check_tracked_train_run(workdir, epochs=epochs_total, model="digits-mlp:1")
