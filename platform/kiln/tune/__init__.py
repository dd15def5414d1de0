"""Hyperparameter sweeps: Ray Tune trials that each run kiln's own DeepSpeed TorchTrainer."""

from kiln.tune.sweep import SweepOutcome, run

__all__ = ["SweepOutcome", "run"]
