"""Warm start: every training worker begins from a registered model's weights, with some
parameters kept frozen (transfer learning, `kiln retrain`).

The weights come through the registry (every file checked against the version's manifest), so a
worker never trains from a modified or half-written version; frozen parameters get
`requires_grad=False` before the DeepSpeed engine is built, so its optimizer never sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from kiln.errors import RegistryError, SpecError
from kiln.registry import Registry

logger = logging.getLogger(__name__)


def warm_start_config(registry: str, ref: str, freeze: Sequence[str]) -> dict[str, Any]:
    """The JSON the driver hands every worker (in the train loop config, as `warm_start`).

    Args:
        registry: the registry root, absolute (or a URI), as every worker can open it.
        ref: the exact `name:version` to start from (never an alias that may move meanwhile).
        freeze: parameter-name prefixes to keep frozen.
    """
    return {"registry": registry, "ref": ref, "freeze": list(freeze)}


def apply_warm_start(model: nn.Module, warm: dict[str, Any]) -> list[str]:
    """Load the registered weights into `model` (strictly) and freeze the requested prefixes.

    Returns:
        The names of the frozen parameters.

    Raises:
        RegistryError: the version fails verification or its weights do not fit `model`.
        SpecError: a prefix matches no parameter, or every parameter would be frozen.
    """
    loaded = Registry(warm["registry"]).load(warm["ref"], verify=True)
    try:
        model.load_state_dict(loaded.tensors, strict=True)
    except RuntimeError as exc:
        raise RegistryError(f"{warm['ref']}: weights do not fit the spec's model: {exc}") from None
    return freeze_parameters(model, warm.get("freeze", []))


def freeze_parameters(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set requires_grad=False on every parameter under one of `prefixes`; returns their names."""
    names = [name for name, _ in model.named_parameters()]
    frozen = set(frozen_names(names, prefixes))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return sorted(frozen)


def frozen_names(names: Iterable[str], prefixes: Sequence[str]) -> list[str]:
    """The parameter names under `prefixes` (a prefix matches whole dotted parts only).

    Raises:
        SpecError: a prefix that matches no parameter (the message lists the model's
            parameters), or prefixes that freeze every parameter.
    """
    names = list(names)
    unknown = [p for p in prefixes if not any(_under(name, p) for name in names)]
    if unknown:
        raise SpecError(
            f"retrain.freeze: {', '.join(repr(p) for p in unknown)} matches no parameter; "
            f"the model's parameters are {_listing(names)} (prefixes: {_listing(_prefixes(names))})"
        )
    frozen = [name for name in names if any(_under(name, p) for p in prefixes)]
    if names and len(frozen) == len(names):
        raise SpecError(
            f"retrain.freeze: {', '.join(prefixes)} freezes every parameter; nothing would train"
        )
    return frozen


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _prefixes(names: list[str]) -> list[str]:
    """Every module path above a parameter (`blocks`, `blocks.0`, `blocks.0.0`, `head`)."""
    seen: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts)):
            seen[".".join(parts[:end])] = None
    return list(seen)


def _listing(items: list[str], limit: int = 24) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"
