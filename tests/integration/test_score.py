"""`score`: a Ray Data job on the session's local Ray. Every input row comes out exactly once,
scored like the Predictor scores it, or set aside with its reason; output appears only whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from kiln.errors import DataError, KilnError
from kiln.inference import Predictor
from kiln.inference.batch import _commit, score
from kiln.registry import Registry
from tests.unit.test_predictor import register_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> str:
    """`digits:1` (missing values filled with the mean), `digits-drop:1` (missing: drop)."""
    root = tmp_path_factory.mktemp("registry")
    train = pq.read_table(digits_dir / "train")
    register_tiny_model(root, train, name="digits")
    Registry(str(root)).promote("digits:1", "production")
    register_tiny_model(root, train, name="digits-drop", preprocess={"missing": "drop"}, seed=1)
    return str(root)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _errors(out: Path) -> pa.Table:
    return pq.read_table(out / "_errors") if any((out / "_errors").iterdir()) else pa.table({})


def test_every_row_scored_once_like_the_predictor(
    registry: str, digits_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    summary = score(
        "digits@production",
        registry=registry,
        input=str(digits_dir / "test"),
        output=str(out),
        batch_size=50,  # several batches per file: keys must still follow each file's rows
        concurrency=(1, 2),
    )
    files = sorted((digits_dir / "test").glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (rows, rows, 0)
    assert summary.model == "digits:1" and summary.rows_per_s > 0

    result = pq.read_table(out)
    assert result.num_rows == rows
    assert set(result["model"].to_pylist()) == {"digits:1"}
    predictor = Predictor(registry, "digits:1")
    by_key = {key: i for i, key in enumerate(result["key"].to_pylist())}
    expected_keys = set()
    for path in files:
        table = pq.read_table(path)
        keys = [f"{path.name}:{row}" for row in range(table.num_rows)]
        expected_keys.update(keys)
        mine = result.take([by_key[k] for k in keys])
        reference = predictor.predict_table(table)
        assert mine["prediction"].to_pylist() == reference["prediction"].tolist()
        probabilities = np.stack([mine[f"prob_{c}"].to_numpy() for c in range(10)], axis=1)
        np.testing.assert_allclose(probabilities, reference["probabilities"], atol=1e-6)
    assert set(by_key) == expected_keys and len(by_key) == rows  # unique, and exactly these

    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_in"] == rows and success["model"] == "digits:1"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".parquet")) == [
        "_SUCCESS",
        "_errors",
    ]
    assert _leftovers(tmp_path) == []  # no staging directory left beside the output

    with pytest.raises(KilnError, match=r"already exists and is not empty.*--overwrite"):
        score("digits:1", registry=registry, input=str(digits_dir / "test"), output=str(out))


def _bad_csvs(digits_dir: Path, directory: Path) -> Path:
    """Two CSV files from the digits test split; a.csv row 5 has px_03 'abc', row 7 no px_10."""
    directory.mkdir()
    table = pq.read_table(digits_dir / "test").drop_columns(["label"])
    for name, part in (("a.csv", table.slice(0, 40)), ("b.csv", table.slice(40, 30))):
        rows = [[f"{v:g}" for v in row.values()] for row in part.to_pylist()]
        if name == "a.csv":
            rows[5][table.column_names.index("px_03")] = "abc"
            rows[7][table.column_names.index("px_10")] = ""
        lines = [",".join(table.column_names), *(",".join(row) for row in rows)]
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def test_quarantine_sets_bad_rows_aside_with_reasons(
    registry: str, digits_dir: Path, tmp_path: Path
) -> None:
    data = _bad_csvs(digits_dir, tmp_path / "csv")
    out = tmp_path / "scores"
    summary = score(
        "digits-drop:1",
        registry=registry,
        input=str(data),
        output=str(out),
        fmt="csv",
        batch_size=16,
        on_error="quarantine",
    )
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (70, 68, 2)

    errors = _errors(out).sort_by("row")
    assert errors["key"].to_pylist() == ["a.csv:5", "a.csv:7"]
    assert errors["row"].to_pylist() == [5, 7]
    assert [Path(f).name for f in errors["file"].to_pylist()] == ["a.csv", "a.csv"]
    reasons = errors["reason"].to_pylist()
    assert reasons[0] == "column 'px_03': 'abc' is not a number"
    assert reasons[1].startswith("missing value in 'px_10'")
    assert errors["px_00"].type == pa.string()  # the input values come along, as text

    scored = pq.read_table(out)
    keys = set(scored["key"].to_pylist()) | set(errors["key"].to_pylist())
    expected = {f"a.csv:{i}" for i in range(40)} | {f"b.csv:{i}" for i in range(30)}
    assert keys == expected and scored.num_rows + errors.num_rows == len(expected)

    # The good rows of the CSV score exactly like the same rows read from parquet.
    predictor = Predictor(registry, "digits-drop:1")
    b_rows = pq.read_table(digits_dir / "test").slice(40, 30)
    b_scored = scored.filter(pa.compute.starts_with(scored["key"], "b.csv:"))
    order = np.argsort([int(k.split(":")[1]) for k in b_scored["key"].to_pylist()])
    reference = predictor.predict_table(b_rows)["prediction"].tolist()
    assert b_scored["prediction"].take(order).to_pylist() == reference


def test_fail_names_the_file_and_row_and_leaves_no_output(
    registry: str, digits_dir: Path, tmp_path: Path
) -> None:
    data = _bad_csvs(digits_dir, tmp_path / "csv")
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=r"a\.csv: row 5: column 'px_03': 'abc' is not a number"):
        score("digits:1", registry=registry, input=str(data), output=str(out), fmt="csv")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_jsonl_with_key_column_and_broken_lines(
    registry: str, digits_dir: Path, tmp_path: Path
) -> None:
    table = pq.read_table(digits_dir / "test").drop_columns(["label"]).slice(0, 20)
    records = table.to_pylist()
    lines = [json.dumps({"id": f"r{i}", **record}) for i, record in enumerate(records)]
    lines[3] = lines[3][:40]  # truncated: not JSON
    lines[8] = json.dumps({"id": "", **records[8]})  # no usable key
    lines[12] = json.dumps({"id": "r12", **{**records[12], "px_20": [1, 2]}})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part.jsonl").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "scores"
    summary = score(
        "digits:1",
        registry=registry,
        input=f"file://{tmp_path / 'in'}",  # URIs work as well as paths
        output=f"file://{out}",
        fmt="jsonl",
        key="id",
        on_error="quarantine",
    )
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (20, 17, 3)
    scored = pq.read_table(out)
    assert scored.column_names[:2] == ["id", "prediction"]
    assert set(scored["id"].to_pylist()) == {f"r{i}" for i in range(20)} - {"r3", "r8", "r12"}

    errors = _errors(out).sort_by("row")
    assert errors["row"].to_pylist() == [3, 8, 12]
    reasons = errors["reason"].to_pylist()
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "key column 'id' is empty"
    assert reasons[2] == "column 'px_20': '[1, 2]' is not a number"

    predictor = Predictor(registry, "digits:1")
    good = [i for i in range(20) if i not in (3, 8, 12)]
    mine = scored.take(np.argsort([int(k[1:]) for k in scored["id"].to_pylist()]))
    reference = predictor.predict_table(table.take(good))
    assert mine["prediction"].to_pylist() == reference["prediction"].tolist()


def test_input_problems_fail_before_any_work(
    registry: str, digits_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    table = pq.read_table(digits_dir / "test").drop_columns(["px_07"])
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=r"column 'px_07' not found in .*part-0\.parquet"):
        score("digits:1", registry=registry, input=str(tmp_path / "in"), output=str(out))
    with pytest.raises(KilnError, match=r"--key: column 'model' clashes"):
        score(
            "digits:1",
            registry=registry,
            input=str(digits_dir / "test"),
            output=str(out),
            key="model",
        )
    assert not out.exists() and _leftovers(tmp_path) == []


def test_object_store_commit_moves_every_file_and_success_last(tmp_path: Path) -> None:
    """Without a directory rename (object stores), files move one by one into place."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert not isinstance(fs, pafs.LocalFileSystem)
    for name in ("part-0.parquet", "_errors/e.parquet", "_SUCCESS"):
        (tmp_path / ".out.staging-x" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ".out.staging-x" / name).write_text(name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_text("old")
    _commit(fs, ".out.staging-x", "out", overwrite=True)
    moved = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert moved == ["out/_SUCCESS", "out/_errors/e.parquet", "out/part-0.parquet"]
    assert _leftovers(tmp_path) == []
