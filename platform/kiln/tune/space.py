"""The search space: `tune.space` as Ray Tune domains, and sampled values applied to the spec.

A trial's config maps dotted spec paths to values (`{"train.lr": 0.003}`); the trial's spec is
the sweep spec with each path set through the same override machinery as `key=value` on the
command line, then validated, so any path of the spec can be swept.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from kiln.config import JobSpec, validate_spec
from kiln.config.load import apply_override
from kiln.config.spec import SearchDimension
from kiln.errors import SpecError

logger = logging.getLogger(__name__)


def sweep_metric(spec: JobSpec) -> tuple[str, Literal["max", "min"]]:
    """The metric and mode that rank trials: `tune.metric`/`tune.mode`, else the spec's own."""
    assert spec.tune is not None
    if spec.tune.metric is None:
        return spec.metric, spec.tune.mode or spec.mode
    lower_is_better = ("loss", "mse", "mae", "rmse")
    derived: Literal["max", "min"] = "min" if spec.tune.metric.endswith(lower_is_better) else "max"
    return spec.tune.metric, spec.tune.mode or derived


def trial_spec(spec: JobSpec, params: dict[str, Any]) -> JobSpec:
    """The spec one trial trains: the sweep spec with `params` applied, its metric set to the
    sweep's metric (so the trial keeps its best checkpoints by it), and no `tune` section.

    Raises:
        SpecError: a sampled value makes the spec invalid; the message names the path.
    """
    metric, mode = sweep_metric(spec)
    raw = spec.model_dump(mode="json", exclude={"tune"})
    raw["train"]["metric"], raw["train"]["mode"] = metric, mode
    for path, value in params.items():
        apply_override(raw, f"{path}={json.dumps(value)}")
    described = ", ".join(f"{path}={value!r}" for path, value in params.items())
    return validate_spec(raw, source=f"tune trial ({described})")


def check_space(spec: JobSpec) -> None:
    """Validate the spec at every endpoint of the space (low, high and each listed value), so a
    space that yields invalid specs fails before any trial starts.

    Raises:
        SpecError: naming the swept path and the value that breaks the spec.
    """
    assert spec.tune is not None
    dimensions = dict(spec.tune.space) | dict(spec.tune.scheduler.mutations)
    for path, dim in dimensions.items():
        for value in _endpoints(dim):
            try:
                trial_spec(spec, {path: value})
            except SpecError as exc:
                raise SpecError(
                    f"tune.space.{path}: value {value!r} gives an invalid spec: {exc}"
                ) from None


def _endpoints(dim: SearchDimension) -> list[Any]:
    if dim.values is not None:
        return list(dim.values)
    assert dim.low is not None and dim.high is not None
    if dim.sample == "randint":
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


def domain(dim: SearchDimension) -> Any:
    """One dimension as a Ray Tune domain (or grid)."""
    from ray import tune

    if dim.sample == "grid":
        return tune.grid_search(list(dim.values or []))
    if dim.sample == "choice":
        return tune.choice(list(dim.values or []))
    assert dim.low is not None and dim.high is not None
    if dim.sample == "randint":
        return tune.randint(int(dim.low), int(dim.high))
    if dim.sample == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.uniform(dim.low, dim.high)


def param_space(spec: JobSpec) -> dict[str, Any]:
    """Tune's param_space: dotted path -> domain."""
    assert spec.tune is not None
    return {path: domain(dim) for path, dim in spec.tune.space.items()}


def search_algorithm(spec: JobSpec, max_concurrent: int) -> Any:
    """Random/grid search, or Optuna's TPE, seeded by `tune.seed`. The random generator takes
    the concurrency limit itself (Tune ignores max_concurrent_trials for it); Tune wraps
    Optuna in a ConcurrencyLimiter from max_concurrent_trials."""
    assert spec.tune is not None
    if spec.tune.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.tune.seed, max_concurrent=max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.tune.seed))


def scheduler(spec: JobSpec) -> Any:
    """FIFO, ASHA or PBT over epochs (the loop reports once per epoch)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    assert spec.tune is not None
    chosen = spec.tune.scheduler
    if chosen.kind == "fifo":
        return FIFOScheduler()
    if chosen.kind == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=spec.train.epochs,
            grace_period=min(chosen.grace_period, spec.train.epochs),
            reduction_factor=chosen.reduction_factor,
        )
    mutations = chosen.mutations or {
        path: dim for path, dim in spec.tune.space.items() if dim.sample != "grid"
    }
    if not mutations:
        raise SpecError("tune.scheduler.mutations: PBT needs at least one path to mutate")
    return PopulationBasedTraining(
        time_attr="epoch",
        perturbation_interval=chosen.perturbation_interval,
        quantile_fraction=chosen.quantile_fraction,
        hyperparam_mutations={path: domain(dim) for path, dim in mutations.items()},
        synch=False,
    )
