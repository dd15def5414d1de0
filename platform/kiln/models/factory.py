"""Turn `model.kind` plus its options into an `nn.Module`.

Built-in kinds are looked up by name. Anything with a colon is a user factory
`package.module:function`, called as `function(spec, input_schema)`, where `spec` is the
`ModelSpec` section and `input_schema` is the fitted preprocessing's description of the inputs
(`num_inputs`, `categorical_cardinalities`, `num_classes`, `task`, feature names).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from kiln.config.spec import ModelSpec
from kiln.errors import SpecError
from kiln.models.causal_lm import build_causal_lm
from kiln.models.hf_lm import build_hf_causal_lm
from kiln.models.tabular import build_tabular_mlp

Factory = Callable[[ModelSpec, dict[str, Any]], nn.Module]

BUILTIN_KINDS: dict[str, Factory] = {
    "tabular_mlp": build_tabular_mlp,
    "causal_lm": build_causal_lm,
    "hf_causal_lm": build_hf_causal_lm,
}


def resolve_factory(kind: str) -> Factory:
    """The factory for `kind`; a SpecError names `model.kind` if it cannot be found."""
    if kind in BUILTIN_KINDS:
        return BUILTIN_KINDS[kind]
    module_name, sep, attr = kind.partition(":")
    if not sep:
        raise SpecError(
            f"model.kind: unknown kind {kind!r}; built-in kinds are {sorted(BUILTIN_KINDS)}, "
            "or give a factory as 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"model.kind: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"model.kind: {module_name!r} has no callable {attr!r}")
    return factory


def build_model(
    spec: ModelSpec, input_schema: dict[str, Any], *, activation_checkpointing: bool = False
) -> nn.Module:
    """Build the module for `spec` from the fitted input schema.

    Args:
        activation_checkpointing: recompute activations in backward; honoured by modules with a
            `checkpointing` attribute or a Hugging Face style `gradient_checkpointing_enable()`.

    Raises:
        SpecError: unknown kind, bad options, or a factory that does not return an nn.Module.
    """
    factory = resolve_factory(spec.kind)
    try:
        module = factory(spec, input_schema)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"model ({spec.kind}): {exc}") from None
    if not isinstance(module, nn.Module):
        raise SpecError(
            f"model.kind: factory {spec.kind!r} returned {type(module).__name__}, not nn.Module"
        )
    if activation_checkpointing:
        _enable_checkpointing(module, spec.kind)
    return module


def _enable_checkpointing(module: Any, kind: str) -> None:
    if hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()
    elif hasattr(module, "checkpointing"):
        module.checkpointing = True
    else:
        raise SpecError(
            f"train.deepspeed.activation_checkpointing: model kind {kind!r} does not support it "
            "(give the module a `checkpointing` attribute or `gradient_checkpointing_enable()`)"
        )
