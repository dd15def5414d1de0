"""The model registry: immutable, numbered, verified model versions with aliases and lineage."""

from kiln.registry.lineage import data_fingerprint, environment
from kiln.registry.store import DEFAULT_ROOT, LoadedVersion, ModelVersion, Registry

__all__ = [
    "DEFAULT_ROOT",
    "LoadedVersion",
    "ModelVersion",
    "Registry",
    "data_fingerprint",
    "environment",
]
