"""The Predictor: a registered model plus its saved preprocessing scores tables like the bare
module would (no Ray). `register_tiny_model` is shared with the scoring tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from kiln.config import JobSpec
from kiln.data.preprocess import Preprocessor, fit_preprocessor, merge_stats, partial_stats
from kiln.errors import DataError, RegistryError
from kiln.inference import Predictor
from kiln.models import build_model
from kiln.registry import ModelVersion, Registry
from kiln.train.export import model_document


def register_tiny_model(
    registry: str | Path,
    table: pa.Table,
    *,
    name: str = "tiny",
    label: str = "label",
    task: str = "classification",
    categorical: Sequence[str] = (),
    preprocess: dict[str, Any] | None = None,
    hidden_sizes: Sequence[int] = (16,),
    seed: int = 0,
) -> ModelVersion:
    """Fit preprocessing on `table` and register an untrained (seeded) `tabular_mlp` for it.

    The weights are random but fixed, which is all scoring tests need: every path that loads
    the model must reproduce the same outputs.
    """
    spec = JobSpec.model_validate(
        {
            "name": name,
            "data": {
                "train": "unused",
                "validation": "unused",
                "label": label,
                "task": task,
                "preprocess": {**(preprocess or {}), "categorical_columns": list(categorical)},
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": list(hidden_sizes)},
        }
    )
    features = [c for c in table.column_names if c != label]
    numeric = [c for c in features if c not in categorical]
    stats = merge_stats(
        [
            partial_stats(
                table, numeric=numeric, categorical=list(categorical), label=label, task=task
            )
        ]
    )
    pre = fit_preprocessor(
        stats,
        spec.data.preprocess,
        features=features,
        numeric=numeric,
        categorical=list(categorical),
        label=label,
        task=task,
    )
    torch.manual_seed(seed)
    module = build_model(spec.model, pre.input_schema())
    documents = {
        "model.json": model_document(spec, pre),
        "preprocessing.json": pre.to_dict(),
        "metrics.json": {"metric": "none", "best": {}, "history": []},
    }
    return Registry(str(registry)).register(name, module.state_dict(), documents)


def _table(n: int = 64, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "a": rng.normal(3.0, 2.0, n),
            "b": rng.integers(0, 100, n),
            "color": rng.choice(["red", "green", "blue"], n),
            "label": rng.choice(["cat", "dog", "eel"], n),
        }
    )


def _reference(module: torch.nn.Module, pre: Preprocessor, table: pa.Table) -> torch.Tensor:
    """The bare module on the saved preprocessing's output: what the Predictor must match."""
    arrays = pre.transform(table, with_label=False)
    with torch.inference_mode():
        args = [torch.from_numpy(arrays["x"])]
        if "x_cat" in arrays:
            args.append(torch.from_numpy(arrays["x_cat"]))
        return module(*args).float()


@pytest.mark.parametrize(("encoding", "rows"), [("onehot", 50), ("index", 50), ("onehot", 300)])
def test_classification_matches_the_bare_module(tmp_path: Path, encoding: str, rows: int) -> None:
    """Also past the row count from which the probabilities take the transposed softmax."""
    table = _table()
    register_tiny_model(
        tmp_path, table, categorical=["color"], preprocess={"categorical": encoding}
    )
    predictor = Predictor(str(tmp_path), "tiny")
    assert (predictor.ref, predictor.task) == ("tiny:1", "classification")
    assert predictor.features == ["a", "b", "color"] and predictor.classes == ["cat", "dog", "eel"]

    scored = _table(n=rows, seed=1).drop_columns(["label"])
    out = predictor.predict_table(scored)
    logits = _reference(predictor.module, predictor.preprocessor, scored)
    classes = np.array(["cat", "dog", "eel"])
    assert out["prediction"].tolist() == classes[logits.argmax(dim=1).numpy()].tolist()
    np.testing.assert_allclose(out["probabilities"], torch.softmax(logits, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (rows, 3)


@pytest.mark.parametrize(
    ("rows", "classes"), [(1, 2), (1, 40), (63, 4), (64, 4), (4096, 4), (300, 15), (300, 16)]
)
def test_probabilities_are_the_softmax_of_the_logits_on_either_path(
    rows: int, classes: int
) -> None:
    """Few classes and many rows take the transposed kernel: same values, rows in order."""
    from kiln.inference.predictor import _softmax

    logits = torch.randn(rows, classes, generator=torch.Generator().manual_seed(rows)) * 4
    probabilities = _softmax(logits)
    assert probabilities.shape == (rows, classes) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), logits.argmax(dim=1).numpy())


def test_loaded_model_is_the_registered_one(tmp_path: Path) -> None:
    """A second registration with other weights gives other outputs: the version is honoured."""
    table = _table()
    register_tiny_model(tmp_path, table, categorical=["color"], seed=0)
    register_tiny_model(tmp_path, table, categorical=["color"], seed=1)
    scored = table.drop_columns(["label"])
    first = Predictor(str(tmp_path), "tiny:1").predict_table(scored)["probabilities"]
    latest = Predictor(str(tmp_path), "tiny").predict_table(scored)["probabilities"]
    assert Predictor(str(tmp_path), "tiny").ref == "tiny:2"
    assert not np.allclose(first, latest)


def test_regression_is_on_the_original_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = pa.table({"x": rng.normal(size=80), "y": rng.normal(500.0, 40.0, 80)})
    register_tiny_model(tmp_path, table, label="y", task="regression", name="reg")
    predictor = Predictor(str(tmp_path), "reg:1")
    assert predictor.task == "regression" and predictor.classes is None

    scored = table.drop_columns(["y"])
    out = predictor.predict_table(scored)
    assert set(out) == {"prediction"}
    raw = _reference(predictor.module, predictor.preprocessor, scored).numpy()
    mean, std = np.mean(table["y"].to_numpy()), np.std(table["y"].to_numpy())
    np.testing.assert_allclose(out["prediction"], raw * std + mean, rtol=1e-5)


def test_missing_feature_column_is_named(tmp_path: Path) -> None:
    register_tiny_model(tmp_path, _table(), categorical=["color"])
    predictor = Predictor(str(tmp_path), "tiny")
    with pytest.raises(DataError, match=r"column 'b' is missing"):
        predictor.predict_table(_table().drop_columns(["b", "label"]))


def test_rows_with_missing_values_under_missing_drop_are_named(tmp_path: Path) -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0, 4.0], "b": [0, 1, 0, 1], "label": [0, 1, 0, 1]})
    register_tiny_model(tmp_path, table, preprocess={"missing": "drop"})
    predictor = Predictor(str(tmp_path), "tiny")
    scored = pa.table({"a": [1.0, None, 3.0, float("nan")], "b": [0, 1, 0, 1]})
    with pytest.raises(DataError, match=r"rows \[1, 3\]: missing feature values"):
        predictor.predict_table(scored)


def test_missing_values_are_filled_under_missing_mean(tmp_path: Path) -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0, 6.0], "b": [0, 1, 0, 1], "label": [0, 1, 0, 1]})
    register_tiny_model(tmp_path, table)
    predictor = Predictor(str(tmp_path), "tiny")
    filled = predictor.predict_table(pa.table({"a": [None], "b": [1]}))
    at_mean = predictor.predict_table(pa.table({"a": [3.0], "b": [1]}))
    np.testing.assert_allclose(filled["probabilities"], at_mean["probabilities"])
    assert filled["prediction"].tolist() == at_mean["prediction"].tolist()


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    mv = register_tiny_model(tmp_path, _table(), categorical=["color"])
    weights = Path(mv.uri) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"model\.safetensors"):
        Predictor(str(tmp_path), "tiny:1")
