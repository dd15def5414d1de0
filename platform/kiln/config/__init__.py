"""The job spec: typed models, YAML loading and overrides."""

from kiln.config.load import apply_override, dump_spec, load_spec, spec_hash, validate_spec
from kiln.config.spec import DataSpec, DeepSpeedSpec, JobSpec, ModelSpec, PreprocessSpec, TrainSpec

__all__ = [
    "DataSpec",
    "DeepSpeedSpec",
    "JobSpec",
    "ModelSpec",
    "PreprocessSpec",
    "TrainSpec",
    "apply_override",
    "dump_spec",
    "load_spec",
    "spec_hash",
    "validate_spec",
]
