"""`kiln score` as a user types it, in a subprocess that starts its own local Ray."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.unit.test_predictor import register_tiny_model

KILN = [str(Path(sys.executable).parent / "kiln")]

pytestmark = pytest.mark.e2e


def kiln(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN", secrets.token_hex(32))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [*KILN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture()
def project(tmp_path: Path, digits_dir: Path) -> Path:
    """A folder with the digits data under data/ and a tiny digits model in .kiln/registry."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir, target_is_directory=True)
    register_tiny_model(
        tmp_path / ".kiln" / "registry", pq.read_table(digits_dir / "train"), name="digits"
    )
    return tmp_path


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_score_writes_one_row_per_input_row_and_a_summary(project: Path) -> None:
    result = kiln(
        "score",
        "digits:1",
        "--input",
        "data/digits/test",
        "--output",
        "out/scores",
        "--concurrency",
        "1:2",
        "--batch-size",
        "100",
        cwd=project,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = r"^scored 360 rows \(0 quarantined\) in [\d.]+ s \([\d,]+ rows/s\) with digits:1"
    assert re.search(summary + r" -> out/scores$", result.stdout.strip()), result.stdout
    assert "scoring 4 parquet files (360 rows) with digits:1" in result.stderr
    # one progress display, as piped output shows it: kiln's summary line, no Ray Data bars
    done = r"^\[kiln\] scoring: done, 360/360 rows in \d+:\d\d \([\d.,]+ rows/s\)$"
    assert re.search(done, result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert "Progress bars" not in result.stderr and "\x1b[" not in result.stderr

    out = project / "out" / "scores"
    table = pq.read_table(out)
    assert table.num_rows == 360 and len(set(table["key"].to_pylist())) == 360
    assert table.column_names == ["key", "prediction", *[f"prob_{c}" for c in range(10)], "model"]
    assert json.loads((out / "_SUCCESS").read_text())["rows_out"] == 360
    assert sorted(p.name for p in (project / "out").iterdir()) == ["scores"]

    again = kiln("score", "digits:1", "--input", "data/digits/test", "--output", "out/scores",
                 cwd=project)  # fmt: skip
    assert re.search(r"out/scores already exists and is not empty", _one_error_line(again))

    # both attempts are tracked runs: the scoring with its counts, the refused one FAILED
    listed = kiln("runs", "list", "--kind", "score", "--json", cwd=project)
    refused, scored = json.loads(listed.stdout)
    assert scored["status"] == "FINISHED" and scored["model"] == "digits:1"
    assert scored["name"] == "out/scores"
    assert scored["last_metrics"]["rows_in"] == scored["last_metrics"]["rows_out"] == 360
    assert scored["last_metrics"]["rows_per_s"] > 0
    assert refused["status"] == "FAILED"
    shown = json.loads(kiln("runs", "show", refused["run_id"], "--json", cwd=project).stdout)
    assert "already exists" in shown["tags"]["kiln.error"]


def test_bad_row_fails_with_file_and_row_and_no_output(project: Path, ray_session: None) -> None:
    """Run against the test session's Ray via --address (as against a cluster): no start-up."""
    import ray

    address = ray.get_runtime_context().gcs_address
    table = pq.read_table(project / "data" / "digits" / "test").drop_columns(["label"])
    rows = [[f"{v:g}" for v in row.values()] for row in table.slice(0, 20).to_pylist()]
    rows[3][table.column_names.index("px_03")] = "abc"
    lines = [",".join(table.column_names), *(",".join(row) for row in rows)]
    (project / "in").mkdir()
    (project / "in" / "a.csv").write_text("\n".join(lines) + "\n")

    result = kiln(
        "score", "digits:1", "--input", "in", "--format", "csv", "--output", "out",
        "--address", address, cwd=project,
    )  # fmt: skip
    line = _one_error_line(result)
    assert re.search(r"in/a\.csv: row 3: column 'px_03': 'abc' is not a number", line), line
    assert "--on-error quarantine" in line
    assert not (project / "out").exists()
    assert not [p for p in project.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--concurrency", "0"], r"argument --concurrency: need 1 <= MIN <= MAX"),
        (["--concurrency", "4:2"], r"argument --concurrency: need 1 <= MIN <= MAX"),
        (["--on-error", "skip"], r"argument --on-error: invalid choice"),
    ],
)
def test_usage_errors(project: Path, args: list[str], pattern: str) -> None:
    result = kiln("score", "digits:1", "--input", "data", "--output", "o", *args, cwd=project)
    assert result.returncode == 2 and re.search(pattern, result.stderr), result.stderr


def test_unknown_model_is_one_line(project: Path) -> None:
    result = kiln("score", "nope@production", "--input", "data", "--output", "o", cwd=project)
    assert re.search(r"unknown model 'nope'.*known models: digits", _one_error_line(result))
