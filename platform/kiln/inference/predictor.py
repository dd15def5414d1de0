"""The Predictor: a registered model plus its saved preprocessing, ready to score tables.

Serving calls `predict_table`; batch scoring applies the same saved preprocessing
(`Preprocessor.encode_rows`) in its read tasks and calls `predict_arrays` on the result, which is
what `predict_table` does in one step. The preprocessing fitted at training time is applied the
same way everywhere, so there is no train/serve skew.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kiln.data.preprocess import Preprocessor
from kiln.errors import DataError
from kiln.registry import Registry
from kiln.registry.model import RegisteredModel, load_model


class Predictor:
    """Score rows with a registered model.

    Args:
        registry: registry root (path or URI).
        ref: `name`, `name:version` or `name@alias`; resolved once, at construction.
        device: torch device, e.g. "cpu" or "cuda".
    """

    def __init__(self, registry: str, ref: str, *, device: str = "cpu") -> None:
        self.model: RegisteredModel = load_model(Registry(registry), ref)
        if not isinstance(self.model.preprocessor, Preprocessor):
            raise DataError(
                f"{self.model.ref} is a language model: it generates text (kiln score "
                "--task generate, the /v1/completions routes) rather than scoring rows"
            )
        self.device = torch.device(device)
        self.module = self.model.module.to(self.device)
        self.preprocessor: Preprocessor = self.model.preprocessor
        self.schema: dict[str, Any] = self.preprocessor.input_schema()

    @property
    def ref(self) -> str:
        """name:version of the loaded model."""
        return self.model.ref

    @property
    def task(self) -> str:
        """classification or regression."""
        return str(self.schema["task"])

    @property
    def features(self) -> list[str]:
        """Input columns, in order."""
        return list(self.schema["features"])

    @property
    def classes(self) -> list[Any] | None:
        """Class labels in probability-column order (classification), else None."""
        return self.schema.get("classes")

    def predict_table(self, table: pa.Table) -> dict[str, np.ndarray]:
        """One prediction per input row.

        Returns:
            `prediction` (original label values, or the regression value on the original scale)
            and, for classification, `probabilities` float32 (rows, classes).

        Raises:
            DataError: a feature column is missing or has the wrong type, or a row cannot be
                scored (a missing value where the model was trained with `missing: drop`),
                naming the row.
        """
        arrays, dropped = self.preprocessor.encode_rows(table)
        if dropped.any():
            rows = np.flatnonzero(dropped)[:5].tolist()
            raise DataError(
                f"rows {rows}: missing feature values, and the model was trained with "
                "data.preprocess.missing: drop"
            )
        return self.predict_arrays(arrays)

    def predict_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`predict_table` of rows this model's preprocessor has already encoded
        (`Preprocessor.encode_rows`: `x`, and `x_cat` with index encoding), as `kiln score`'s
        read tasks do."""
        with torch.inference_mode():
            x = _tensor(arrays["x"]).to(self.device)
            if "x_cat" in arrays:
                output = self.module(x, _tensor(arrays["x_cat"]).to(self.device))
            else:
                output = self.module(x)
            output = output.float().cpu()
        if self.task == "classification":
            probabilities = _softmax(output)
            prediction = self.preprocessor.inverse_label(probabilities.argmax(axis=1))
            return {"prediction": prediction, "probabilities": probabilities}
        return {"prediction": self.preprocessor.inverse_label(output.numpy())}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """The array as a tensor without a copy. Arrays viewing Arrow memory are read-only, which
    torch warns about; the forward pass only reads its inputs."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def _softmax(logits: torch.Tensor) -> np.ndarray:
    """Class probabilities of (rows, classes) logits.

    With few classes and many rows, softmax runs over dim 0 of the (classes, rows) view: torch's
    kernel along a short last dimension is 6-8x slower there (4,096 rows: 4 classes 245 -> 28 us,
    10 classes 511 -> 79 us), and slower the other way from 16 classes up. The result is then
    column-major, which the batch job's per-class columns read without a copy.
    """
    rows, classes = logits.shape
    if classes < 16 and rows >= 64:
        return torch.softmax(logits.T, dim=0).T.numpy()
    return torch.softmax(logits, dim=-1).numpy()
