"""Drift scores of live (or scored) inputs against a training profile: PSI and KS per feature.

Both compare bin counts, never raw values: the training counts stored in the profile and the
counts of the inputs seen (`Binner`). A feature is over threshold when its PSI or (numeric) KS
exceeds the threshold and enough inputs were seen to judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.monitor.profile import Binner, FeatureProfile, Profile

DEFAULT_PSI = 0.2
"""PSI above this is the usual "significant shift" rule of thumb."""
DEFAULT_KS = 0.1
DEFAULT_MIN_SAMPLES = 100
SMOOTHING = 0.5
"""Pseudo-count added to every bin before PSI, so an empty bin gives a finite score."""


@dataclass(frozen=True)
class Thresholds:
    """When a feature counts as drifted."""

    psi: float = DEFAULT_PSI
    ks: float = DEFAULT_KS
    features: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    """Per-feature (psi, ks) overrides; None keeps the default."""
    min_samples: int = DEFAULT_MIN_SAMPLES
    """Fewer inputs with a value than this: the feature is not judged."""

    def of(self, name: str) -> tuple[float, float]:
        """The (psi, ks) thresholds of one feature."""
        psi, ks = self.features.get(name, (None, None))
        return (self.psi if psi is None else psi, self.ks if ks is None else ks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "psi": self.psi,
            "ks": self.ks,
            "features": {k: list(v) for k, v in self.features.items()},
            "min_samples": self.min_samples,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Thresholds:
        features = {k: (v[0], v[1]) for k, v in dict(document.get("features", {})).items()}
        return cls(
            psi=float(document.get("psi", DEFAULT_PSI)),
            ks=float(document.get("ks", DEFAULT_KS)),
            features=features,
            min_samples=int(document.get("min_samples", DEFAULT_MIN_SAMPLES)),
        )


def proportions(counts: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Bin shares with `smoothing` pseudo-counts per bin: (c + s) / (n + s * bins)."""
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + smoothing) / (counts.sum() + smoothing * counts.size)


def psi(expected: np.ndarray, actual: np.ndarray, smoothing: float = SMOOTHING) -> float:
    """Population stability index: sum over bins of (a - e) * ln(a / e), with e and a the
    training and live bin shares after `smoothing` pseudo-counts (so empty bins stay finite).

    0 means identical shares; 0.1-0.2 a moderate shift; above 0.2 a significant one.
    """
    e = proportions(expected, smoothing)
    a = proportions(actual, smoothing)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_binned(expected: np.ndarray, actual: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic of two binned samples: the largest gap between their
    empirical CDFs, evaluated at the bin edges only (the upper edge of every bin), so it is at
    most the KS of the raw values and equals it when every distinct value has its own bin.
    Empty samples give 0."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(e) / e.sum() - np.cumsum(a) / a.sum())))


def feature_drift(item: FeatureProfile, live: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """One feature's scores against its training counts (`live`: its bins, missing last)."""
    psi_limit, ks_limit = thresholds.of(item.name)
    present = int(live[:-1].sum())
    rows = int(live.sum())
    score = psi(item.expected(), live)
    ks = ks_binned(np.asarray(item.counts), live[:-1]) if item.kind == "numeric" else None
    judged = present >= thresholds.min_samples
    over = judged and (score > psi_limit or (ks is not None and ks > ks_limit))
    train_rows = item.count + item.missing
    return {
        "name": item.name,
        "kind": item.kind,
        "psi": round(score, 6),
        "ks": None if ks is None else round(ks, 6),
        "psi_threshold": psi_limit,
        "ks_threshold": ks_limit if item.kind == "numeric" else None,
        "over": bool(over),
        "judged": judged,
        "samples": present,
        "missing_rate": round((rows - present) / rows, 6) if rows else 0.0,
        "train_missing_rate": round(item.missing / train_rows, 6) if train_rows else 0.0,
    }


def drift_report(profile: Profile, counts: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """Every feature's PSI/KS for a flat `Binner` count vector, drifted features first.

    Returns:
        `samples` (inputs counted), `features` (see `feature_drift`), `over` (names of the
        drifted features), `judged` (features with enough inputs) and a one-line `verdict`.
    """
    binner = Binner(profile)
    parts = binner.split(np.asarray(counts, dtype=np.int64))
    features = [
        feature_drift(item, part, thresholds)
        for item, part in zip(profile.features, parts, strict=True)
    ]
    samples = int(parts[0].sum()) if parts else 0
    features.sort(key=lambda f: (not f["over"], -f["psi"]))
    over = [f["name"] for f in features if f["over"]]
    judged = sum(f["judged"] for f in features)
    return {
        "samples": samples,
        "over": over,
        "judged": judged,
        "features": features,
        "verdict": verdict(samples, over, judged, len(features), thresholds.min_samples),
    }


def verdict(samples: int, over: list[str], judged: int, total: int, min_samples: int) -> str:
    """One line a person reads: drift or not, and on what evidence."""
    if samples == 0:
        return "no inputs in the window: nothing to compare"
    if judged == 0:
        return f"too few inputs to judge ({samples} < {min_samples} per feature)"
    if over:
        shown = ", ".join(over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
        return f"DRIFT: {len(over)} of {total} features over threshold ({shown}); {samples} inputs"
    skipped = f", {total - judged} with too few values" if judged < total else ""
    return f"no drift: all {judged} judged features under threshold{skipped}; {samples} inputs"
