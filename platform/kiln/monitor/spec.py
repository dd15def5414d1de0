"""The `monitor` sections of a serve spec: drift thresholds and the live-statistics window.

`ServeSpec.monitor` holds the application's settings; `models[].monitor` may override the
thresholds (and the on/off switch) of one model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.monitor.drift import DEFAULT_KS, DEFAULT_MIN_SAMPLES, DEFAULT_PSI, Thresholds


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class FeatureThresholdSpec(_Spec):
    psi: float | None = Field(default=None, gt=0.0)
    """PSI threshold of this feature (default: the model's)."""
    ks: float | None = Field(default=None, gt=0.0, le=1.0)
    """KS threshold of this feature (default: the model's)."""


class ModelMonitorSpec(_Spec):
    enabled: bool | None = None
    """Record this model's live inputs (default: the application's `monitor.enabled`)."""
    psi_threshold: float | None = Field(default=None, gt=0.0)
    """PSI above which a feature has drifted (default: the application's)."""
    ks_threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    """KS above which a numeric feature has drifted (default: the application's)."""
    min_samples: int | None = Field(default=None, ge=1)
    """Live values a feature needs before it is judged (default: the application's)."""
    features: dict[str, FeatureThresholdSpec] = Field(default_factory=dict)
    """Per-feature thresholds, by raw input column name."""


class MonitorSpec(_Spec):
    """Drift of live inputs against the training profile saved at registration."""

    enabled: bool = True
    """Count live inputs into the training profile's bins (a model without a profile, such as
    a language model, is never monitored)."""
    psi_threshold: float = Field(default=DEFAULT_PSI, gt=0.0)
    """PSI above which a feature has drifted (0.2 is the usual "significant shift")."""
    ks_threshold: float = Field(default=DEFAULT_KS, gt=0.0, le=1.0)
    """KS statistic (at the profile's bin edges) above which a numeric feature has drifted."""
    min_samples: int = Field(default=DEFAULT_MIN_SAMPLES, ge=1)
    """Live values a feature needs in the window before it is judged."""
    features: dict[str, FeatureThresholdSpec] = Field(default_factory=dict)
    """Per-feature thresholds, by raw input column name (every model of the application)."""
    window_s: float = Field(default=3600.0, gt=0.0)
    """Window of the exported drift gauges, and the default of `GET .../drift`."""
    bucket_s: float = Field(default=60.0, gt=0.0)
    """Live counts are kept per time bucket of this many seconds."""
    retention_s: float = Field(default=86_400.0, gt=0.0)
    """Buckets older than this are dropped (the longest window a query can ask for)."""
    flush_interval_s: float = Field(default=5.0, gt=0.0)
    """How often each replica sends its counts to the application's drift store; queries
    and gauges lag live traffic by at most this much."""

    @model_validator(mode="after")
    def _ordered(self) -> MonitorSpec:
        if not self.bucket_s <= self.window_s <= self.retention_s:
            raise ValueError(
                f"need bucket_s ({self.bucket_s}) <= window_s ({self.window_s}) <= retention_s "
                f"({self.retention_s})"
            )
        return self

    def for_model(self, model: ModelMonitorSpec | None) -> tuple[bool, Thresholds]:
        """Whether a model is monitored, and its thresholds."""
        model = model or ModelMonitorSpec()
        features = {name: (t.psi, t.ks) for name, t in {**self.features, **model.features}.items()}
        thresholds = Thresholds(
            psi=model.psi_threshold or self.psi_threshold,
            ks=model.ks_threshold or self.ks_threshold,
            features=features,
            min_samples=model.min_samples or self.min_samples,
        )
        enabled = self.enabled if model.enabled is None else model.enabled
        return enabled, thresholds
