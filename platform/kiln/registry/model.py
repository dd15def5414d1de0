"""Rebuild a registered model: the bare `nn.Module` with its weights, and its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from kiln.config.spec import ModelSpec
from kiln.data.fitted import FittedPreprocessor, preprocessor_from_dict
from kiln.errors import RegistryError
from kiln.models import build_model
from kiln.registry.store import LoadedVersion, Registry


@dataclass(frozen=True)
class RegisteredModel:
    module: nn.Module
    """The bare module in eval mode, weights loaded strictly from model.safetensors."""
    preprocessor: FittedPreprocessor
    loaded: LoadedVersion

    @property
    def ref(self) -> str:
        """name:version."""
        return self.loaded.version.ref


def load_model(registry: Registry, ref: str) -> RegisteredModel:
    """Resolve `ref`, verify every file against the manifest, and rebuild the module.

    Raises:
        RegistryError: unknown ref, a file that fails verification, or weights that do not fit
            the module the model document describes.
    """
    loaded = registry.load(ref, verify=True)
    document: dict[str, Any] = loaded.documents["model.json"]
    spec = ModelSpec.model_validate({"kind": document["kind"], **document.get("options", {})})
    module = build_model(spec, document["input_schema"])
    try:
        module.load_state_dict(loaded.tensors, strict=True)
    except RuntimeError as exc:
        raise RegistryError(f"{loaded.version.ref}: weights do not fit the model: {exc}") from None
    module.eval()
    preprocessor = preprocessor_from_dict(loaded.documents["preprocessing.json"])
    return RegisteredModel(module, preprocessor, loaded)
