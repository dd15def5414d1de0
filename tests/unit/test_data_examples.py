"""Example datasets: digits, synthetic data and python-stdlib, written as sharded parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kiln.cli.main import main
from kiln.data.examples import write_digits, write_python_stdlib, write_synth
from kiln.data.source import check_files, resolve_files
from kiln.errors import DataError


def read_split(out: Path, split: str) -> pa.Table:
    return pq.read_table(out / split)


def shard_names(out: Path, split: str) -> list[str]:
    return sorted(p.name for p in (out / split).iterdir())


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_sizes_columns_and_classes(tmp_path: Path) -> None:
    summary = write_digits(tmp_path / "digits")
    train, test = read_split(tmp_path / "digits", "train"), read_split(tmp_path / "digits", "test")
    assert train.num_rows + test.num_rows == 1797
    assert summary["rows"] == {"train": train.num_rows, "test": test.num_rows}
    assert test.num_rows == 360  # ceil(0.2 * 1797)
    assert train.column_names == [f"px_{i:02d}" for i in range(64)] + ["label"]
    assert train.schema.field("px_00").type == pa.float32()
    assert train.schema.field("label").type == pa.int64()
    assert summary["classes"] == 10
    for table in (train, test):
        assert sorted(set(table.column("label").to_pylist())) == list(range(10))
    pixels = np.stack([train.column(f"px_{i:02d}").to_numpy() for i in range(64)])
    assert pixels.min() == 0.0 and pixels.max() == 16.0
    assert shard_names(tmp_path / "digits", "train") == [f"part-0000{i}.parquet" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["test", "train"]


def test_digits_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    write_digits(tmp_path / "a", seed=3)
    write_digits(tmp_path / "b", seed=3)
    write_digits(tmp_path / "c", seed=4)
    a, b, c = (read_split(tmp_path / name, "test") for name in "abc")
    assert a.equals(b) and not a.equals(c)
    counts = np.bincount(a.column("label").to_numpy())
    assert counts.min() >= 35 and counts.max() <= 37  # ~36 per class


def test_digits_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    write_digits(tmp_path / "d", shards=2)
    with pytest.raises(DataError, match=r"train already exists and is not empty.*--overwrite"):
        write_digits(tmp_path / "d")
    write_digits(tmp_path / "d", shards=3, overwrite=True)
    assert len(shard_names(tmp_path / "d", "train")) == 3
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["test", "train"]


def test_digits_pass_the_source_checks(tmp_path: Path) -> None:
    summary = write_digits(tmp_path / "d")
    files = resolve_files(summary["paths"]["train"], "parquet")
    info = check_files(
        files,
        label="label",
        features=None,
        task="classification",
        categorical_columns=None,
        field="data.train",
    )
    assert info.num_rows == summary["rows"]["train"]
    assert len(info.numeric) == 64 and info.categorical == ()


def test_digits_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--shards must be >= 1"):
        write_digits(tmp_path / "d", shards=0)
    with pytest.raises(DataError, match="--test-fraction"):
        write_digits(tmp_path / "d", test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# synth


def test_synth_rows_shards_and_row_groups(tmp_path: Path) -> None:
    out = tmp_path / "s"
    summary = write_synth(out, rows=10_000, features=5, shards=4, rows_per_group=1000)
    assert summary["rows"] == {"train": 9000, "test": 1000}
    assert summary["shards"] == {"train": 4, "test": 1}
    assert shard_names(out, "train") == [f"part-0000{i}.parquet" for i in range(4)]
    first = pq.ParquetFile(out / "train" / "part-00000.parquet")
    assert first.metadata.num_rows == 2250
    assert first.metadata.num_row_groups == 3  # bounded memory: 1000 rows at a time
    train = read_split(out, "train")
    assert train.num_rows == 9000
    assert train.column_names == [f"feat_{i:03d}" for i in range(5)] + ["label"]
    assert train.schema.field("feat_000").type == pa.float32()
    assert train.schema.field("label").type == pa.int64()


def test_synth_is_reproducible(tmp_path: Path) -> None:
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        write_synth(
            tmp_path / name, rows=500, features=4, categorical=1, missing_fraction=0.1, seed=seed
        )
    # pandas compares NaN equal to NaN; arrow's Table.equals does not
    a, b, c = (read_split(tmp_path / name, "train").to_pandas() for name in "abc")
    assert a.equals(b) and not a.equals(c)


def test_synth_classification_is_learnable(tmp_path: Path) -> None:
    summary = write_synth(tmp_path / "s", rows=3000, features=12, classes=3, seed=1)
    train = read_split(tmp_path / "s", "train").to_pandas()
    test = read_split(tmp_path / "s", "test").to_pandas()
    features = summary["features"]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(train[features], train["label"])
    majority = test["label"].value_counts(normalize=True).max()
    assert sorted(train["label"].unique()) == [0, 1, 2]
    assert model.score(test[features], test["label"]) > majority + 0.3


def test_synth_regression_is_learnable(tmp_path: Path) -> None:
    summary = write_synth(tmp_path / "s", rows=2000, features=8, task="regression", seed=2)
    train = read_split(tmp_path / "s", "train")
    assert train.schema.field("label").type == pa.float32()
    frame, test = train.to_pandas(), read_split(tmp_path / "s", "test").to_pandas()
    model = LinearRegression().fit(frame[summary["features"]], frame["label"])
    assert model.score(test[summary["features"]], test["label"]) > 0.5
    assert summary["classes"] is None


def test_synth_categorical_and_missing_values(tmp_path: Path) -> None:
    summary = write_synth(
        tmp_path / "s", rows=20_000, features=3, categorical=2, missing_fraction=0.2, seed=5
    )
    assert summary["categorical"] == ["cat_00", "cat_01"]
    train = read_split(tmp_path / "s", "train")
    assert train.schema.field("cat_00").type == pa.string()
    values = set(train.column("cat_00").drop_null().to_pylist())
    assert 3 <= len(values) <= 11 and all(v.startswith("v") for v in values)
    for name in ("cat_00", "cat_01"):
        assert train.column(name).null_count / train.num_rows == pytest.approx(0.2, abs=0.02)
    numeric = train.column("feat_000").to_numpy()
    assert np.isnan(numeric).mean() == pytest.approx(0.2, abs=0.02)
    assert train.column("label").null_count == 0


def test_synth_informative_subset(tmp_path: Path) -> None:
    summary = write_synth(tmp_path / "s", rows=100, features=50, informative=5)
    assert summary["informative"] == 5 and len(summary["features"]) == 50


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(rows=0, features=3), "--rows must be >= 1"),
        (dict(rows=1, features=3), "--rows must be >= 2"),
        (dict(rows=10, features=0), "--features must be >= 1"),
        (dict(rows=10, features=3, classes=1), "--classes must be >= 2"),
        (dict(rows=10, features=3, shards=0), "--shards must be >= 1"),
        (dict(rows=10, features=3, task="ranking"), "--task must be"),
        (dict(rows=10, features=3, informative=4), r"--informative must be 1\.\.3"),
        (dict(rows=10, features=3, categorical=-1), "--categorical must be >= 0"),
        (dict(rows=10, features=3, missing_fraction=1.0), "--missing-fraction"),
        (dict(rows=10, features=3, test_fraction=0.0), "--test-fraction"),
        (dict(rows=10, features=3, rows_per_group=0), "--rows-per-group"),
    ],
)
def test_synth_bad_options_name_the_option(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        write_synth(tmp_path / "s", **options)
    assert not (tmp_path / "s").exists()


def test_synth_refuses_existing_output(tmp_path: Path) -> None:
    write_synth(tmp_path / "s", rows=20, features=2)
    with pytest.raises(DataError, match="already exists"):
        write_synth(tmp_path / "s", rows=20, features=2)


# ---------------------------------------------------------------------------------------------
# python-stdlib


def _fake_stdlib(root: Path, modules: int = 60) -> Path:
    """A small standard-library-like tree with the things the writer must skip."""
    for i in range(modules):
        package = root / f"pkg{i % 3}"
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod_{i:02d}.py").write_text(
            f'"""Module {i}: naïve café ☕."""\n\n\ndef function_{i}(x, y=1):\n    return x + {i}\n'
        )
    for skipped in ("site-packages", "__pycache__", "dist-packages"):
        (root / skipped).mkdir()
        (root / skipped / "installed.py").write_text("def installed():\n    pass\n")
    (root / "pkg0" / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    (root / "pkg0" / "notes.txt").write_text("not python")
    return root


def test_python_stdlib_small_tree(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "lib")
    out = tmp_path / "corpus"
    summary = write_python_stdlib(out, root=root, shards=2, prompts=5)
    train, validation = read_split(out, "train"), read_split(out, "validation")
    assert train.column_names == validation.column_names == ["path", "text"]
    assert train.schema.field("text").type == pa.string()
    paths = train.column("path").to_pylist() + validation.column("path").to_pylist()
    expected = sorted(f"pkg{i % 3}/mod_{i:02d}.py" for i in range(60))
    assert sorted(paths) == expected  # skipped dirs, non-UTF-8 and non-.py files are left out
    assert not set(train.column("path").to_pylist()) & set(validation.column("path").to_pylist())
    assert summary["skipped_not_utf8"] == ["pkg0/latin1.py"]
    assert summary["files"] == 61
    assert summary["documents"] == {"train": train.num_rows, "validation": validation.num_rows}
    assert validation.num_rows >= 1
    texts = train.column("text").to_pylist()
    assert summary["bytes"]["train"] == sum(len(t.encode()) for t in texts)
    assert "naïve café ☕" in texts[0]
    assert shard_names(out, "train") == ["part-00000.parquet", "part-00001.parquet"]
    prompts = pq.read_table(out / "prompts.parquet").column("prompt").to_pylist()
    assert len(prompts) == 5 == len(set(prompts)) == summary["prompts"]
    assert all(p.startswith("def function_") and p.endswith("):\n") for p in prompts)
    validation_text = "".join(validation.column("text").to_pylist())
    assert any(p in validation_text for p in prompts)  # held-out signatures come first


def test_python_stdlib_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "lib", modules=200)
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        write_python_stdlib(tmp_path / name, root=root, seed=seed)
    a, b, c = (read_split(tmp_path / name, "validation") for name in "abc")
    assert a.equals(b) and not a.equals(c)
    assert 3 <= a.num_rows <= 25  # about 5% of 200
    prompts = [pq.read_table(tmp_path / name / "prompts.parquet") for name in "ab"]
    assert prompts[0].equals(prompts[1])


def test_python_stdlib_refuses_existing_output(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "lib", modules=10)
    write_python_stdlib(tmp_path / "out", root=root, shards=3)
    with pytest.raises(DataError, match=r"train already exists.*--overwrite"):
        write_python_stdlib(tmp_path / "out", root=root)
    write_python_stdlib(tmp_path / "out", root=root, shards=1, overwrite=True)
    assert shard_names(tmp_path / "out", "train") == ["part-00000.parquet"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "prompts.parquet",
        "train",
        "validation",
    ]
    with pytest.raises(DataError, match="--shards must be >= 1"):
        write_python_stdlib(tmp_path / "other", root=root, shards=0)
    with pytest.raises(DataError, match="at least 2 readable .py files"):
        write_python_stdlib(tmp_path / "other", root=tmp_path / "lib" / "site-packages")


def test_python_stdlib_of_this_interpreter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "example", "python-stdlib", str(tmp_path / "py"), "--shards", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    train, validation = (
        read_split(tmp_path / "py", "train"),
        read_split(tmp_path / "py", "validation"),
    )
    assert summary["documents"] == {"train": train.num_rows, "validation": validation.num_rows}
    assert train.num_rows > 500  # CPython's standard library has well over a thousand modules
    assert 0.02 < validation.num_rows / (train.num_rows + validation.num_rows) < 0.09
    train_paths = set(train.column("path").to_pylist())
    assert "os.py" in train_paths | set(validation.column("path").to_pylist())
    assert not any("site-packages" in p for p in train_paths)
    assert summary["shards"] == {"train": 3, "validation": 1}
    assert summary["bytes"]["train"] > 5_000_000
    prompts = pq.read_table(tmp_path / "py" / "prompts.parquet").column("prompt").to_pylist()
    assert len(set(prompts)) == 16 and all(p.startswith("def ") for p in prompts)
    again = write_python_stdlib(tmp_path / "again", shards=3)
    assert again["documents"] == summary["documents"]
    assert read_split(tmp_path / "again", "validation").equals(validation)
