"""The fitted preprocessing saved with a run or a registered model, whatever the task."""

from __future__ import annotations

from typing import Any

from kiln.data.preprocess import Preprocessor
from kiln.data.text import TextPreprocessor

FittedPreprocessor = Preprocessor | TextPreprocessor
"""Tabular preprocessing (classification, regression) or tokenization and packing (language
modeling): both give `input_schema()`, `to_dict()` and a `task`."""


def preprocessor_from_dict(document: dict[str, Any]) -> FittedPreprocessor:
    """Rebuild the preprocessor that `to_dict()` wrote (preprocessing.json, kiln_run.json)."""
    if document.get("kind") == "text":
        return TextPreprocessor.from_dict(document)
    return Preprocessor.from_dict(document)
