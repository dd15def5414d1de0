"""read_dataset: checked files read by Ray Data, in each format, with the resolved filesystem."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data.source import read_dataset, resolve_files

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_parquet_with_columns_and_remote_args(tmp_path: Path) -> None:
    for i, name in enumerate(["part-0.parquet", "part-1.pq"]):
        table = pa.table({"x": [1.0 * i] * 5, "extra": ["e"] * 5, "label": [i] * 5})
        pq.write_table(table, tmp_path / name)
    files = resolve_files(f"file://{tmp_path}", "parquet")
    dataset = read_dataset(
        files, columns=["x", "label"], ray_remote_args={"num_cpus": 0.5}, override_num_blocks=2
    )
    rows = dataset.take_all()
    assert len(rows) == 10  # the .pq file is read too: Ray's extension filter is off
    assert set(rows[0]) == {"x", "label"}
    assert sorted({row["label"] for row in rows}) == [0, 1]


def test_csv_gz_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("x,tag,label\n1.5,a,1\n2.5,b,0\n")
    with gzip.open(tmp_path / "csv" / "b.csv.gz", "wt") as out:
        out.write("x,tag,label\n3.5,c,1\n")
    csv = read_dataset(resolve_files(str(tmp_path / "csv"), "csv"), columns=["x", "label"])
    assert sorted(row["x"] for row in csv.take_all()) == [1.5, 2.5, 3.5]
    assert csv.schema().names == ["x", "label"]

    (tmp_path / "json").mkdir()
    lines = [json.dumps({"x": float(i), "label": i % 2}) for i in range(6)]
    (tmp_path / "json" / "a.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = read_dataset(resolve_files(str(tmp_path / "json"), "jsonl"), columns=["label"])
    assert jsonl.count() == 6 and jsonl.schema().names == ["label"]
