"""The read side of `kiln score` without Ray: the planned column types and the blocks that
`read_items` yields, and that a read task's module does not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln import storage
from kiln.data.source import resolve_files
from kiln.inference.batch import _ModelPlan, _plan
from kiln.inference.batch_read import ERROR, FILE, ROW, read_items

REPO = Path(__file__).resolve().parents[2]


def _job(directory: Path, out: Path, key: str | None = None):
    plan = _ModelPlan("m:1", ("a", "b", "c"), (), (pa.field("prediction", pa.int64()),), None)
    files = resolve_files(str(directory), "parquet", field="--input")
    fs, path = storage.open_location(str(out), field="--output")
    job, expected = _plan(files, plan, key, fs, path, str(out), "fail", 0)
    return job, expected


def test_float32_features_stay_float32_only_where_every_file_stores_float32(
    tmp_path: Path,
) -> None:
    data = tmp_path / "in"
    data.mkdir()
    # a: float32 everywhere; b: float32 in one file, float64 in the other; c: int32.
    pq.write_table(
        pa.table(
            {
                "a": pa.array([0.5, None, 2.25], pa.float32()),
                "b": pa.array([1.0, 2.0, 3.0], pa.float32()),
                "c": pa.array([1, 2, None], pa.int32()),
            }
        ),
        data / "one.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "a": pa.array([4.5], pa.float32()),
                "b": pa.array([0.1], pa.float64()),
                "c": pa.array([7], pa.int32()),
            }
        ),
        data / "two.parquet",
    )
    job, expected = _job(data, tmp_path / "out")
    assert expected == 4
    assert job.float_types == (pa.float32(), pa.float64(), pa.float64())

    (tmp_path / "out").mkdir()
    blocks = [
        block
        for index in range(len(job.items))
        for block in read_items(pa.table({"item": [index]}), job)
    ]
    # Every block has the same schema, whichever file it came from.
    schemas = {block.schema for block in blocks}
    assert len(schemas) == 1
    schema = schemas.pop()
    assert [schema.field(n).type for n in ("a", "b", "c")] == list(job.float_types)
    assert {FILE, ROW, ERROR} <= set(schema.names)
    table = pa.concat_tables(blocks)
    assert table.column("a").to_pylist() == [0.5, None, 2.25, 4.5]
    np.testing.assert_array_equal(table.column("b").to_numpy(), [1.0, 2.0, 3.0, 0.1])
    assert table.column("c").to_pylist() == [1.0, 2.0, None, 7.0]
    assert table.column(ROW).to_pylist() == [0, 1, 2, 0]


def test_a_numeric_key_column_keeps_float64(tmp_path: Path) -> None:
    data = tmp_path / "in"
    data.mkdir()
    columns = {name: pa.array([0.1, 0.2], pa.float32()) for name in ("a", "b", "c")}
    pq.write_table(pa.table(columns), data / "one.parquet")
    job, _ = _job(data, tmp_path / "out", key="a")
    assert job.float_types == (pa.float64(), pa.float32(), pa.float32())
    assert job.key_type == pa.float64()


def test_read_tasks_and_the_progress_counter_do_not_import_torch() -> None:
    # Ray pickles these by reference: a read task (and the progress counter's own actor process)
    # imports their module, which must not pull in torch (over a second of CPU per fresh worker
    # process; the counter importing it cost every job about 3 s on two cores).
    from kiln.inference import batch, batch_read

    shipped = [batch.Job, batch.Item, batch.GenerateOptions, batch.RowCounter, batch.read_items]
    assert {thing.__module__ for thing in shipped} == {batch_read.__name__}
    code = (
        "import sys, kiln.inference.batch_read, kiln.inference; "
        "print('torch' in sys.modules, 'kiln.inference.predictor' in sys.modules)"
    )
    env_path = str(REPO / "platform")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.stdout.split() == ["False", "False"]
