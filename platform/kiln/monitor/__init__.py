"""Drift monitoring: training profiles, PSI/KS drift scores, live statistics in serving."""

from kiln.monitor.drift import DEFAULT_KS, DEFAULT_PSI, Thresholds, drift_report, ks_binned, psi
from kiln.monitor.profile import (
    PROFILE_FILE,
    Binner,
    FeatureProfile,
    Profile,
    merge_profiles,
    profile_dataset,
    profile_table,
)
from kiln.monitor.window import RollingCounts

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_PSI",
    "PROFILE_FILE",
    "Binner",
    "FeatureProfile",
    "Profile",
    "RollingCounts",
    "Thresholds",
    "drift_report",
    "ks_binned",
    "merge_profiles",
    "profile_dataset",
    "profile_table",
    "psi",
]
