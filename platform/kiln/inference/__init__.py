"""Inference: one Predictor shared by Ray Serve endpoints and Ray Data batch scoring."""

from kiln.inference.predictor import Predictor

__all__ = ["Predictor"]
