"""`kiln score`'s scoring actor without Ray: it takes whole blocks, calls the predictor on at most
`--batch-size` rows at a time, and a row the predictor refuses is set aside while the rest of
the block is scored."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln import storage
from kiln.data.source import resolve_files
from kiln.errors import DataError
from kiln.inference import Predictor
from kiln.inference.batch import ERRORS, ScoringActor, _model_plan, _plan
from kiln.inference.batch_read import read_items
from tests.unit.test_predictor import register_tiny_model

BAD = 999.0  # the fake predictor refuses rows whose `a` is this


def _block(tmp_path: Path, rows: int, batch_size: int, bad_rows: tuple[int, ...]):
    rng = np.random.default_rng(0)
    train = pa.table(
        {"a": rng.normal(size=64), "b": rng.normal(size=64), "label": rng.integers(0, 3, 64)}
    )
    registry = tmp_path / "registry"
    model = register_tiny_model(registry, train).ref
    a = rng.normal(size=rows)
    a[list(bad_rows)] = BAD
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.table({"a": a, "b": rng.normal(size=rows)}), data / "part.parquet")
    files = resolve_files(str(data), "parquet", field="--input")
    out_fs, staging = storage.open_location(str(tmp_path / "staging"), field="--output")
    out_fs.create_dir(storage.join(staging, ERRORS), recursive=True)
    plan = _model_plan(str(registry), model, None)
    job, _ = _plan(files, plan, None, out_fs, staging, str(registry), "quarantine", 0)
    job = replace(job, batch_size=batch_size)
    (block,) = list(read_items(pa.table({"item": [0]}), job))
    return job, block, str(registry), model


def test_the_predictor_sees_batch_size_rows_at_a_time_and_a_refused_row_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, block, registry, model = _block(tmp_path, rows=10, batch_size=3, bad_rows=(7,))
    actor = ScoringActor(job)
    real = actor.predictor.predict_table
    calls: list[int] = []

    def refusing(table: pa.Table) -> dict[str, np.ndarray]:
        calls.append(table.num_rows)
        if BAD in table.column("a").to_pylist():
            raise DataError("a: not a value this model takes")
        return real(table)

    monkeypatch.setattr(actor.predictor, "predict_table", refusing)
    out = actor(block)

    assert max(calls) == 3  # never more than --batch-size rows per call
    good = [i for i in range(10) if i != 7]
    assert out.column("key").to_pylist() == [f"part.parquet:{i}" for i in good]
    expected = Predictor(registry, model).predict_table(block.take(good))
    np.testing.assert_array_equal(out.column("prediction").to_numpy(), expected["prediction"])
    for k in range(expected["probabilities"].shape[1]):
        np.testing.assert_allclose(
            out.column(out.schema.names[2 + k]).to_numpy(),
            expected["probabilities"][:, k],
            rtol=1e-6,
        )
    (errors,) = (Path(job.staging) / ERRORS).glob("*.parquet")
    aside = pq.read_table(errors)
    assert aside.column("row").to_pylist() == [7]
    assert aside.column("reason").to_pylist() == ["a: not a value this model takes"]


def test_a_block_of_good_rows_scores_like_one_predictor_call(tmp_path: Path) -> None:
    job, block, registry, model = _block(tmp_path, rows=1000, batch_size=64, bad_rows=())
    out = ScoringActor(job)(block)
    expected = Predictor(registry, model).predict_table(block)
    assert out.num_rows == 1000
    np.testing.assert_array_equal(out.column("prediction").to_numpy(), expected["prediction"])
    assert not list((Path(job.staging) / ERRORS).glob("*.parquet"))
