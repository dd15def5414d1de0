"""Locating and checking data files: the errors a user sees before any training starts."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from kiln.config.spec import DataSpec
from kiln.data import source
from kiln.data.source import DataInfo, FileSet, check_data, check_files, resolve_files
from kiln.errors import DataError


def write_parquet(path: Path, **columns: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def table_rows(n: int = 4, offset: int = 0) -> dict[str, list]:
    return {
        "x": [float(i + offset) for i in range(n)],
        "color": ["red", "blue"] * (n // 2),
        "flag": [True, False] * (n // 2),
        "label": [i % 2 for i in range(n)],
    }


def check(
    files: FileSet,
    *,
    label: str = "label",
    features: list[str] | None = None,
    task: str = "classification",
    categorical_columns: list[str] | None = None,
) -> DataInfo:
    return check_files(
        files,
        label=label,
        features=features,
        task=task,
        categorical_columns=categorical_columns,
        field="data.train",
    )


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """data/ with two parquet shards, one nested, plus files that must be ignored."""
    data = tmp_path / "data"
    write_parquet(data / "part-00000.parquet", **table_rows())
    write_parquet(data / "nested" / "part-00001.pq", **table_rows(offset=4))
    write_parquet(data / "_temporary" / "part-9.parquet", **table_rows())
    write_parquet(data / ".hidden.parquet", **table_rows())
    (data / "_SUCCESS").write_text("")
    (data / "README.md").write_text("not data")
    return data


# ---------------------------------------------------------------------------------------------
# resolve_files


def test_directory_is_searched_recursively_skipping_hidden_and_other_files(shards: Path) -> None:
    files = resolve_files(str(shards), "parquet")
    assert files.paths == (
        str(shards / "nested" / "part-00001.pq"),
        str(shards / "part-00000.parquet"),
    )
    assert files.sizes == tuple(os.path.getsize(p) for p in files.paths)
    assert all(isinstance(m, float) for m in files.mtimes)
    assert files.location == str(shards) and files.format == "parquet"
    assert files.uris() == list(files.paths)


def test_single_file_and_relative_path(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shards.parent)
    files = resolve_files("data/part-00000.parquet", "parquet")
    assert files.paths == (str(shards / "part-00000.parquet"),)
    assert files.display(files.paths[0]) == "data/part-00000.parquet"


def test_globs_match_within_one_directory_unless_double_star(shards: Path) -> None:
    top = resolve_files(str(shards / "*.parquet"), "parquet")
    assert [Path(p).name for p in top.paths] == ["part-00000.parquet"]
    deep = resolve_files(str(shards / "**" / "part-*"), "parquet")
    assert [Path(p).name for p in deep.paths] == ["part-00001.pq", "part-00000.parquet"]
    chars = resolve_files(str(shards / "part-0000[0-9].parquet"), "parquet")
    assert len(chars.paths) == 1


def test_file_uri_directory_and_glob(shards: Path) -> None:
    files = resolve_files(f"file://{shards}", "parquet")
    assert len(files.paths) == 2
    globbed = resolve_files(f"file://{shards}/**/*.pq", "parquet")
    assert globbed.paths == (str(shards / "nested" / "part-00001.pq"),)


def test_object_store_uri_gives_scheme_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    store = pafs._MockFileSystem()
    store.create_dir("bucket/prefix/sub")
    for name in ["prefix/a.parquet", "prefix/sub/b.parquet", "prefix/_c.parquet", "x.parquet"]:
        with store.open_output_stream(f"bucket/{name}") as out:
            out.write(b"PAR1")

    def fake_filesystem(base: str) -> tuple[pafs.FileSystem, str]:
        assert base.startswith("s3://bucket")
        return store, base.removeprefix("s3://")

    monkeypatch.setattr(source, "_filesystem", fake_filesystem)
    files = resolve_files("s3://bucket/prefix", "parquet")
    assert files.uris() == ["s3://bucket/prefix/a.parquet", "s3://bucket/prefix/sub/b.parquet"]
    globbed = resolve_files("s3://bucket/prefix/*.parquet", "parquet")
    assert globbed.uris() == ["s3://bucket/prefix/a.parquet"]
    assert globbed.display(globbed.paths[0]) == "s3://bucket/prefix/a.parquet"


def test_nothing_found_names_field_format_and_location(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.validation: no csv files found at '.*empty'"):
        resolve_files(str(tmp_path / "empty"), "csv", field="data.validation")
    with pytest.raises(DataError, match=r"data.train: no parquet files found at"):
        resolve_files(str(tmp_path / "missing"), "parquet")
    with pytest.raises(DataError, match="no parquet files found"):
        resolve_files(str(tmp_path / "*.parquet"), "parquet")


def test_unknown_uri_scheme_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"data.train: cannot read 'nosuch://bucket/x' \("):
        resolve_files("nosuch://bucket/x", "parquet")


def test_fingerprint_is_stable_and_follows_the_files(shards: Path) -> None:
    first = resolve_files(str(shards), "parquet").fingerprint()
    assert first == resolve_files(str(shards), "parquet").fingerprint()
    assert [f["path"] for f in first["files"]][1].endswith("part-00000.parquet")
    assert set(first["files"][0]) == {"path", "size", "mtime"}
    write_parquet(shards / "part-00000.parquet", **table_rows(n=6))
    assert resolve_files(str(shards), "parquet").fingerprint()["sha256"] != first["sha256"]


# ---------------------------------------------------------------------------------------------
# check_files: parquet


def test_schema_features_and_categorical_inference(shards: Path) -> None:
    info = check(resolve_files(str(shards), "parquet"))
    assert info.features == ("x", "color", "flag")
    assert info.categorical == ("color", "flag")
    assert info.numeric == ("x",)
    assert info.num_rows == 8
    assert info.schema.names == ["x", "color", "flag", "label"]


def test_spec_feature_order_and_explicit_categoricals(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", code=[1, 2], x=[0.5, 1.0], label=["a", "b"])
    files = resolve_files(str(path), "parquet")
    info = check(files, features=["x", "code"], categorical_columns=["code"])
    assert info.features == ("x", "code")
    assert info.categorical == ("code",) and info.numeric == ("x",)


def test_categorical_columns_must_be_features_and_cover_strings(shards: Path) -> None:
    files = resolve_files(str(shards), "parquet")
    with pytest.raises(DataError, match="categorical_columns: 'nope' is not a feature column"):
        check(files, categorical_columns=["nope"])
    with pytest.raises(DataError, match="feature 'color' is a string column"):
        check(files, categorical_columns=["flag"])


def test_missing_label_names_file_and_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", x=[1.0], target=[1])
    with pytest.raises(DataError) as caught:
        check(resolve_files(str(tmp_path / "d"), "parquet"))
    message = str(caught.value)
    assert "label column 'label' not found in" in message
    assert "part-0.parquet" in message and "columns: x, target" in message


def test_missing_feature_in_one_file(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", x=[1.0], y=[2.0], label=[1])
    write_parquet(tmp_path / "d" / "part-1.parquet", x=[1.0], label=[0])
    with pytest.raises(DataError, match=r"feature column 'y' not found in .*part-1.parquet"):
        check(resolve_files(str(tmp_path / "d"), "parquet"))


def test_regression_label_must_be_numeric(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", x=[1.0, 2.0], label=["low", "high"])
    with pytest.raises(DataError, match=r"label column 'label' is string.*must be numeric"):
        check(resolve_files(str(path), "parquet"), task="regression")


def test_classification_label_rejects_floats(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", x=[1.0, 2.0], label=[0.0, 1.0])
    with pytest.raises(DataError, match="classification label must be integer, string or bool"):
        check(resolve_files(str(path), "parquet"))
    assert check(resolve_files(str(path), "parquet"), task="regression").numeric == ("x",)


def test_type_mismatch_across_files_names_both(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "part-0.parquet", x=[1.0], zip=["02139"], label=[1])
    write_parquet(tmp_path / "d" / "part-1.parquet", x=[2.0], zip=[2139], label=[0])
    with pytest.raises(DataError) as caught:
        check(resolve_files(str(tmp_path / "d"), "parquet"))
    message = str(caught.value)
    assert "column 'zip' is string in" in message and "but int64 in" in message
    assert "part-0.parquet" in message and "part-1.parquet" in message


def test_numeric_types_promote_across_files(tmp_path: Path) -> None:
    small = pa.table({"x": pa.array([1], pa.int32()), "label": pa.array([1], pa.int8())})
    big = pa.table({"x": pa.array([1.5], pa.float64()), "label": pa.array([0], pa.int64())})
    (tmp_path / "d").mkdir()
    pq.write_table(small, tmp_path / "d" / "a.parquet")
    pq.write_table(big, tmp_path / "d" / "b.parquet")
    info = check(resolve_files(str(tmp_path / "d"), "parquet"))
    assert info.schema.field("x").type == pa.float64()
    assert info.schema.field("label").type == pa.int64()


def test_unsupported_feature_type(tmp_path: Path) -> None:
    when = pa.array([0, 1], pa.timestamp("s"))
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"when": when, "label": [0, 1]}), tmp_path / "d" / "a.parquet")
    with pytest.raises(DataError, match=r"column 'when' has unsupported type timestamp\[ms\] in"):
        check(resolve_files(str(tmp_path / "d"), "parquet"))


def test_dictionary_strings_are_categorical(tmp_path: Path) -> None:
    city = pa.array(["a", "b", "a"]).dictionary_encode()
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"city": city, "label": [1, 0, 1]}), tmp_path / "d" / "a.parquet")
    info = check(resolve_files(str(tmp_path / "d"), "parquet"))
    assert info.categorical == ("city",)


def test_corrupt_parquet_names_the_file(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (shards / "part-00002.parquet").write_bytes(b"this is not parquet at all" * 10)
    monkeypatch.chdir(shards.parent)
    with pytest.raises(DataError) as caught:
        check(resolve_files("data", "parquet"))
    assert str(caught.value).startswith(
        "data.train: data/part-00002.parquet is not a readable parquet file ("
    )


def test_zero_rows_is_empty(tmp_path: Path) -> None:
    empty = pa.table({"x": pa.array([], pa.float64()), "label": pa.array([], pa.int64())})
    (tmp_path / "d").mkdir()
    pq.write_table(empty, tmp_path / "d" / "a.parquet")
    with pytest.raises(DataError, match=r"data.train: the data at .* is empty \(0 rows"):
        check(resolve_files(str(tmp_path / "d"), "parquet"))


def test_pandas_index_column_is_not_a_feature(tmp_path: Path) -> None:
    table = pa.table({"x": [1.0], "label": [1], "__index_level_0__": [7]})
    pq.write_table(table, tmp_path / "a.parquet")
    assert check(resolve_files(str(tmp_path / "a.parquet"), "parquet")).features == ("x",)


# ---------------------------------------------------------------------------------------------
# check_files: csv and jsonl


def test_csv_schema_from_first_block(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("x,color,label\n1.5,red,1\n2.5,blue,0\n")
    with gzip.open(tmp_path / "d" / "b.csv.gz", "wt") as out:
        out.write("x,color,label\n3,red,1\n")
    info = check(resolve_files(str(tmp_path / "d"), "csv"))
    assert info.features == ("x", "color") and info.categorical == ("color",)
    assert info.schema.field("x").type == pa.float64()
    assert info.num_rows is None


def test_csv_bigger_than_one_block_is_cut_at_a_line(tmp_path: Path) -> None:
    line = "1.25,some-long-category-value-to-fill-the-block,1\n"
    rows = (1 << 20) // len(line) + 500
    (tmp_path / "big.csv").write_text("x,color,label\n" + line * rows)
    info = check(resolve_files(str(tmp_path / "big.csv"), "csv"), task="regression")
    assert info.schema.field("label").type == pa.int64()


def test_csv_with_only_a_header_is_empty(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,label\n")
    with pytest.raises(DataError, match=r"a.csv is empty \(no rows\)"):
        check(resolve_files(str(tmp_path / "a.csv"), "csv"))


def test_malformed_csv_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,label\n1,2\n1,2,3\n")
    with pytest.raises(DataError, match=r"a.csv is not a readable csv file \("):
        check(resolve_files(str(tmp_path / "a.csv"), "csv"))


def test_jsonl_schema_and_missing_label(tmp_path: Path) -> None:
    rows = [{"x": 1, "tag": "a", "label": 1.5}, {"x": 2.5, "tag": "b", "label": 0.5}]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "d" / "b.ndjson.gz", "wt") as out:
        out.write(json.dumps(rows[0]) + "\n")
    info = check(resolve_files(str(tmp_path / "d"), "jsonl"), task="regression")
    assert info.features == ("x", "tag") and info.schema.field("x").type == pa.float64()
    with pytest.raises(DataError, match=r"label column 'y' not found in .*a.jsonl"):
        check(resolve_files(str(tmp_path / "d"), "jsonl"), label="y", task="regression")


def test_empty_jsonl_file(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(DataError, match=r"a.jsonl is empty"):
        check(resolve_files(str(tmp_path / "a.jsonl"), "jsonl"))


# ---------------------------------------------------------------------------------------------
# check_data


def test_check_data_train_and_validation(tmp_path: Path) -> None:
    write_parquet(tmp_path / "train" / "a.parquet", **table_rows())
    write_parquet(tmp_path / "val" / "a.parquet", **table_rows(n=2))
    spec = DataSpec(train=str(tmp_path / "train"), validation=str(tmp_path / "val"), label="label")
    train, validation = check_data(spec)
    assert validation is not None
    assert train.num_rows == 4 and validation.num_rows == 2
    assert validation.features == train.features


def test_check_data_validation_type_mismatch(tmp_path: Path) -> None:
    write_parquet(tmp_path / "train" / "a.parquet", x=[1.0, 2.0], label=[0, 1])
    write_parquet(tmp_path / "val" / "a.parquet", x=["1", "2"], label=[0, 1])
    spec = DataSpec(train=str(tmp_path / "train"), validation=str(tmp_path / "val"), label="label")
    with pytest.raises(DataError, match=r"data.validation: column 'x' is string there but double"):
        check_data(spec)


def test_check_data_split_only_checks_train(tmp_path: Path) -> None:
    write_parquet(tmp_path / "train" / "a.parquet", **table_rows())
    spec = DataSpec(train=str(tmp_path / "train"), validation_split=0.2, label="label")
    train, validation = check_data(spec)
    assert validation is None and train.files.format == "parquet"
