"""Turn a training checkpoint into a registered model version.

The checkpoint already holds the consolidated fp32 weights (`model.safetensors`, written by rank
0 from any ZeRO stage), so registration reads safetensors and JSON only, never DeepSpeed's
pickled engine state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from kiln.config import JobSpec, dump_spec
from kiln.data.fitted import FittedPreprocessor
from kiln.errors import TrainingError
from kiln.registry import ModelVersion, Registry
from kiln.train.loop import EVALUATION_FILE, WEIGHTS_FILE


def model_document(spec: JobSpec, preprocessor: FittedPreprocessor) -> dict[str, Any]:
    """model.json: what is needed to rebuild the bare module (kind, options, input schema)."""
    options = spec.model.options
    if spec.model.kind == "hf_causal_lm":
        from kiln.models.hf_lm import portable_options

        options = portable_options(options)  # no dependence on a local pretrained directory
    return {
        "kind": spec.model.kind,
        "options": options,
        "task": spec.data.task,
        "input_schema": preprocessor.input_schema(),
        "weights": WEIGHTS_FILE,
        "format": 1,
    }


def register_checkpoint(
    registry: Registry,
    spec: JobSpec,
    checkpoint: Any,
    preprocessor: FittedPreprocessor,
    *,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    lineage: dict[str, Any],
    profile: dict[str, Any] | None = None,
) -> ModelVersion:
    """Register the checkpoint's weights with the model, preprocessing, metrics and lineage,
    and the training data's `profile` (drift monitoring) when given."""
    with checkpoint.as_directory() as directory:
        weights = Path(directory, WEIGHTS_FILE)
        if not weights.is_file():
            raise TrainingError(f"checkpoint {checkpoint.path} has no {WEIGHTS_FILE}")
        tensors = load_file(str(weights))
        evaluation = _read_evaluation(Path(directory, EVALUATION_FILE), preprocessor)
    documents = {
        "model.json": model_document(spec, preprocessor),
        "preprocessing.json": preprocessor.to_dict(),
        "metrics.json": {
            "metric": spec.metric,
            "mode": spec.mode,
            "best": _plain(metrics),
            "history": [_plain(epoch) for epoch in history],
        },
        "lineage.json": {"spec": spec.model_dump(mode="json"), **lineage},
    }
    if evaluation is not None:
        documents[EVALUATION_FILE] = evaluation
    if profile is not None:
        documents["profile.json"] = profile
    return registry.register(
        spec.name, tensors, documents, extra_files={"spec.yaml": dump_spec(spec).encode()}
    )


def _read_evaluation(path: Path, preprocessor: FittedPreprocessor) -> dict[str, Any] | None:
    """The checkpoint epoch's evaluation (None for checkpoints from before it existed), with
    the class labels of the fitted preprocessing in class-index order."""
    if not path.is_file():
        return None
    evaluation: dict[str, Any] = json.loads(path.read_text())
    classes = getattr(getattr(preprocessor, "label", None), "classes", None)
    if evaluation.get("task") == "classification" and classes is not None:
        evaluation["labels"] = [c if isinstance(c, (int, str, bool)) else str(c) for c in classes]
        for label, scores in zip(evaluation["labels"], evaluation["per_class"], strict=True):
            scores["label"] = label
    return evaluation


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
