"""Turn a training checkpoint into a registered model version.

The checkpoint already holds the consolidated fp32 weights (`model.safetensors`, written by rank
0 from any ZeRO stage), so registration reads safetensors and JSON only, never DeepSpeed's
pickled engine state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from kiln.config import JobSpec, dump_spec
from kiln.data.fitted import FittedPreprocessor
from kiln.errors import TrainingError
from kiln.registry import ModelVersion, Registry
from kiln.train.loop import WEIGHTS_FILE


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
) -> ModelVersion:
    """Register the checkpoint's weights with the model, preprocessing, metrics and lineage."""
    with checkpoint.as_directory() as directory:
        weights = Path(directory, WEIGHTS_FILE)
        if not weights.is_file():
            raise TrainingError(f"checkpoint {checkpoint.path} has no {WEIGHTS_FILE}")
        tensors = load_file(str(weights))
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
    return registry.register(
        spec.name, tensors, documents, extra_files={"spec.yaml": dump_spec(spec).encode()}
    )


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
