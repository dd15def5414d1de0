"""Connecting to Ray and planning what each part of a job may use."""

from kiln.cluster.resources import (
    ResourcePlan,
    SweepPlan,
    connect,
    local_resources,
    plan_sweep,
    plan_training,
)

__all__ = [
    "ResourcePlan",
    "SweepPlan",
    "connect",
    "local_resources",
    "plan_sweep",
    "plan_training",
]
