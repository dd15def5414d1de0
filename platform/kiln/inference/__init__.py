"""Inference: one Predictor shared by Ray Serve endpoints and Ray Data batch scoring.

`Predictor` is imported on first use (PEP 562): importing a light module of this package, such
as `kiln.inference.batch_read` in a Ray Data read task, must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.inference.predictor import Predictor

__all__ = ["Predictor"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from kiln.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
