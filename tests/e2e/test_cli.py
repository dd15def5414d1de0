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

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

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
        "train", "spec.yaml", "train.epochs=4", "train.deepspeed.zero_stage=3", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered digits-mlp:1" in result.stdout
    metrics = json.loads(result.stdout.split("metrics: ", 1)[1].splitlines()[0])
    assert metrics["val_accuracy"] >= 0.9
    assert re.search(r"epoch \d+ step \d+ loss [\d.]+ lr [\d.e+-]+ samples/s \d+", result.stderr)

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
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = subprocess.Popen(
        [
            *KILN,
            "train",
            "spec.yaml",
            "train.epochs=6",
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
    result = kiln("train", "--resume", str(run_dir), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"resumed from checkpoint after epoch [1-5]", result.stderr)
    assert "registered digits-mlp:1" in result.stdout
