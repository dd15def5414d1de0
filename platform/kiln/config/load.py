"""Read a job spec from YAML, apply `key=value` overrides, validate, and report errors by path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kiln.config.spec import JobSpec
from kiln.errors import SpecError


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Parse the YAML job spec at `path`, apply dotted overrides, and validate it.

    Args:
        path: the YAML file.
        overrides: `train.num_workers=2`-style strings; values are parsed as YAML.

    Raises:
        SpecError: unreadable file, bad YAML, bad override or a field that fails validation.
    """
    raw = read_yaml_mapping(path, what="job spec")
    for item in overrides:
        apply_override(raw, item)
    return validate_spec(raw, source=str(path))


def validate_spec(raw: dict[str, Any], source: str = "job spec") -> JobSpec:
    """Validate a raw mapping into a JobSpec; the error names every bad dotted path."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, source)) from None


def read_yaml_mapping(path: str | Path, *, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; SpecError names the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a {what} is a YAML mapping, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in `raw` in place; a numeric part indexes a list (`models.0.ref=...`).

    Raises:
        SpecError: not `key=value`, a value that is not YAML, or a path through a value.
    """
    key, sep, text = item.partition("=")
    parts = key.split(".")
    if not sep or any(not part for part in parts):
        raise SpecError(f"override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"override {item!r}: value is not valid YAML ({exc})") from None
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"override {item!r}: {where} is not an index of that list")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            raise SpecError(f"override {item!r}: {where} is a value, not a section")


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming every failing dotted path of a pydantic error."""
    return f"{source}: " + "; ".join(_describe(err) for err in exc.errors())


def spec_hash(spec: JobSpec) -> str:
    """A stable sha256 of the validated spec (defaults filled in), for lineage."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dump_spec(spec: JobSpec) -> str:
    """The validated spec as YAML, defaults included, so a run can be repeated exactly."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _describe(err: Any) -> str:
    path = ".".join(str(part) for part in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required field is missing"
    message = err["msg"].removeprefix("Value error, ")
    if kind not in ("value_error", "assertion_error") and "input" in err:
        message += f" (got {err['input']!r})"
    return f"{path}: {message}"
