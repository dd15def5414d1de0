"""`kiln score` without Ray: the read task applies the model's preprocessing (and counts drift),
the scoring actor takes whole encoded blocks and calls the predictor on at most `--batch-size`
rows at a time, and a row the model cannot take is set aside while the rest is scored."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln import storage
from kiln.data.source import resolve_files
from kiln.inference import Predictor
from kiln.inference.batch import ERRORS, ScoringActor, _model_plan, _plan
from kiln.inference.batch_read import DRIFT_PARTS, ERROR, X_CAT, X, read_items
from kiln.monitor.profile import Binner, profile_table
from tests.unit.test_predictor import register_tiny_model


def _job(
    tmp_path: Path,
    inputs: pa.Table,
    *,
    batch_size: int = 1024,
    on_error: str = "quarantine",
    **model: Any,
):
    rng = np.random.default_rng(0)
    train = pa.table(
        {
            "a": rng.normal(size=64),
            "b": rng.normal(size=64),
            "color": rng.choice(["red", "green", "blue"], 64),
            "label": rng.integers(0, 3, 64),
        }
    )
    registry = tmp_path / "registry"
    model = register_tiny_model(registry, train, categorical=["color"], **model).ref
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(inputs, data / "part.parquet")
    files = resolve_files(str(data), "parquet", field="--input")
    out_fs, staging = storage.open_location(str(tmp_path / "staging"), field="--output")
    out_fs.create_dir(storage.join(staging, ERRORS), recursive=True)
    plan = _model_plan(str(registry), model, None)
    job, _ = _plan(files, plan, None, out_fs, staging, str(registry), on_error, 0)
    return replace(job, batch_size=batch_size), str(registry), model


def _inputs(rows: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "a": rng.normal(size=rows),
            "b": rng.normal(size=rows),
            "color": rng.choice(["red", "green", "blue", "violet"], rows),
        }
    )


def _read(job) -> pa.Table:
    return pa.concat_tables(read_items(pa.table({"item": [0]}), job))


def _assert_scored_like_the_predictor(out: pa.Table, expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(out.column("prediction").to_numpy(), expected["prediction"])
    for k in range(expected["probabilities"].shape[1]):
        np.testing.assert_allclose(
            out.column(out.schema.names[2 + k]).to_numpy(),
            expected["probabilities"][:, k],
            rtol=1e-6,
        )


@pytest.mark.parametrize("encoding", ["onehot", "index"])
def test_a_block_is_encoded_by_its_read_task_and_scores_like_one_predictor_call(
    tmp_path: Path, encoding: str
) -> None:
    inputs = _inputs(1000)
    job, registry, model = _job(
        tmp_path, inputs, batch_size=64, on_error="fail", preprocess={"categorical": encoding}
    )
    block = _read(job)
    # the features travel encoded; their raw columns only where a set-aside row needs them
    assert X in block.column_names and "a" not in block.column_names
    assert (X_CAT in block.column_names) == (encoding == "index")

    out = ScoringActor(job)(block)
    assert out.column("key").to_pylist() == [f"part.parquet:{i}" for i in range(1000)]
    _assert_scored_like_the_predictor(out, Predictor(registry, model).predict_table(inputs))
    assert not list((Path(job.staging) / ERRORS).glob("*.parquet"))


def test_the_predictor_sees_at_most_batch_size_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _inputs(10)
    job, registry, model = _job(tmp_path, inputs, batch_size=3)
    actor = ScoringActor(job)
    real = actor.predictor.predict_arrays
    calls: list[int] = []

    def counting(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(arrays["x"]))
        return real(arrays)

    monkeypatch.setattr(actor.predictor, "predict_arrays", counting)
    out = actor(_read(job))
    assert calls == [3, 3, 3, 1]
    _assert_scored_like_the_predictor(out, Predictor(registry, model).predict_table(inputs))


def test_a_row_the_model_cannot_take_is_set_aside_with_its_inputs_and_the_rest_scored(
    tmp_path: Path,
) -> None:
    inputs = _inputs(10)
    a = inputs.column("a").to_numpy().copy()
    a[7] = np.nan
    inputs = inputs.set_column(0, "a", pa.array(a))
    job, registry, model = _job(tmp_path, inputs, batch_size=4, preprocess={"missing": "drop"})
    block = _read(job)
    assert block.column(ERROR).to_pylist()[7].startswith("missing value in 'a'")

    out = ScoringActor(job)(block)
    good = [i for i in range(10) if i != 7]
    assert out.column("key").to_pylist() == [f"part.parquet:{i}" for i in good]
    expected = Predictor(registry, model).predict_table(inputs.take(good))
    _assert_scored_like_the_predictor(out, expected)
    (errors,) = (Path(job.staging) / ERRORS).glob("*.parquet")
    aside = pq.read_table(errors)
    assert aside.column("row").to_pylist() == [7]
    assert aside.column("reason").to_pylist()[0].startswith("missing value in 'a' (the model")
    assert aside.column("color").to_pylist() == [inputs.column("color")[7].as_py()]


def test_read_tasks_count_the_scorable_rows_into_the_drift_bins(tmp_path: Path) -> None:
    inputs = _inputs(300)
    a = inputs.column("a").to_numpy().copy()
    a[[5, 120]] = np.nan
    inputs = inputs.set_column(0, "a", pa.array(a))
    job, _, _ = _job(tmp_path, inputs, preprocess={"missing": "drop"})
    profile = profile_table(_inputs(500, seed=2), numeric=["a", "b"], categorical=["color"])
    job = replace(job, profile=profile)
    _read(job)
    (part,) = (Path(job.staging) / DRIFT_PARTS).glob("*.json")
    scorable = inputs.take([i for i in range(300) if i not in (5, 120)])
    assert json.loads(part.read_text()) == Binner(profile).count(scorable).tolist()
