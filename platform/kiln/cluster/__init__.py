"""Connecting to Ray and planning what each part of a job may use."""

from kiln.cluster.resources import ResourcePlan, connect, plan_training

__all__ = ["ResourcePlan", "connect", "plan_training"]
