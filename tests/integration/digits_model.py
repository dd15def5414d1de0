"""The digits model the serving tests register: its spec and preprocessing fitted on the whole
training split in-process (no Ray), so a fixture can register weights in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.config import JobSpec, validate_spec
from kiln.data.preprocess import Preprocessor, fit_preprocessor, merge_stats, partial_stats
from kiln.train.export import model_document

FEATURES = [f"px_{i:02d}" for i in range(64)]


def fitted_digits(
    digits_dir: Path, hidden_sizes: list[int]
) -> tuple[JobSpec, Preprocessor, pa.Table, dict[str, Any]]:
    """(spec, fitted preprocessing, the training table, the model.json/preprocessing.json
    documents a registration needs)."""
    spec = validate_spec(
        {
            "name": "digits-mlp",
            "data": {"train": str(digits_dir / "train"), "validation_split": 0.2, "label": "label"},
            "model": {"kind": "tabular_mlp", "hidden_sizes": hidden_sizes},
        }
    )
    table = pq.read_table(sorted((digits_dir / "train").glob("*.parquet")))
    stats = partial_stats(
        table, numeric=FEATURES, categorical=[], label="label", task="classification"
    )
    pre = fit_preprocessor(
        merge_stats([stats]),
        spec.data.preprocess,
        features=FEATURES,
        numeric=FEATURES,
        categorical=[],
        label="label",
        task="classification",
    )
    documents = {"model.json": model_document(spec, pre), "preprocessing.json": pre.to_dict()}
    return spec, pre, table, documents
