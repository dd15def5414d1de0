"""The `tune` section: validation errors by dotted path, sampled values applied to any spec path,
and the Tune search space, search algorithm and scheduler built from it."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.config import validate_spec
from kiln.errors import SpecError
from kiln.tune import space

BASE: dict[str, Any] = {
    "name": "m",
    "data": {"train": "d", "validation_split": 0.2, "label": "y"},
    "train": {"num_workers": 2, "batch_size": 64},
}


def spec_with(tune: dict[str, Any], **top: Any) -> Any:
    return validate_spec({**BASE, **top, "tune": tune})


def error_of(tune: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        spec_with(tune)
    return str(info.value)


def test_space_errors_name_the_dotted_path() -> None:
    assert "tune.space.train.lr: low (0.1) must be below high (0.01)" in error_of(
        {"space": {"train.lr": {"sample": "loguniform", "low": 0.1, "high": 0.01}}}
    )
    assert "tune.space.train.lr: loguniform needs low > 0" in error_of(
        {"space": {"train.lr": {"sample": "loguniform", "low": 0, "high": 0.01}}}
    )
    assert "choice takes a non-empty `values` list" in error_of(
        {"space": {"model.dropout": {"sample": "choice", "values": []}}}
    )
    assert "tune.space.train.lr.step: unknown key" in error_of(
        {"space": {"train.lr": {"sample": "uniform", "low": 0.1, "high": 1, "step": 2}}}
    )
    assert "tune.scheduler.kind" in error_of({"space": {}, "scheduler": {"kind": "hyperband"}})


def test_cross_field_errors_are_actionable() -> None:
    assert "sweep a path under data., model. or train." in error_of(
        {"space": {"registry": {"sample": "choice", "values": ["a", "b"]}}}
    )
    assert "tune.space.train.seed: grid needs tune.search random" in error_of(
        {"search": "optuna", "space": {"train.seed": {"sample": "grid", "values": [1, 2]}}}
    )
    assert "tune.metric 'val_r2' is not reported for classification" in error_of(
        {"metric": "val_r2", "space": {"train.lr": {"sample": "uniform", "low": 0.1, "high": 1}}}
    )
    assert "PBT cannot mutate a grid" in error_of(
        {
            "space": {"train.lr": {"sample": "uniform", "low": 0.1, "high": 1}},
            "scheduler": {
                "kind": "pbt",
                "mutations": {"train.lr": {"sample": "grid", "values": [1]}},
            },
        }
    )


def test_trial_spec_applies_values_at_any_path_and_validates() -> None:
    spec = spec_with(
        {"metric": "val_loss", "space": {"train.lr": {"sample": "uniform", "low": 0.1, "high": 1}}}
    )
    trial = space.trial_spec(
        spec,
        {
            "train.lr": 0.25,
            "model.hidden_sizes": [32, 16],
            "train.deepspeed.zero_stage": 3,
            "data.preprocess.scaling": "minmax",
        },
    )
    assert trial.train.lr == 0.25
    assert trial.model.options["hidden_sizes"] == [32, 16]
    assert trial.train.deepspeed.zero_stage == 3
    assert trial.data.preprocess.scaling == "minmax"
    assert trial.tune is None
    # the trial keeps its best checkpoints by the sweep's metric
    assert (trial.metric, trial.mode) == ("val_loss", "min")
    assert spec.train.lr == 1e-3  # the sweep spec is untouched
    with pytest.raises(SpecError, match=r"train.deepspeed.zero_stage.*\(got 5\)"):
        space.trial_spec(spec, {"train.deepspeed.zero_stage": 5})


def test_check_space_refuses_values_that_break_the_spec() -> None:
    spec = spec_with({"space": {"train.num_workers": {"sample": "choice", "values": [2, 3]}}})
    with pytest.raises(SpecError, match=r"tune.space.train.num_workers: value 3 .*batch_size"):
        space.check_space(spec)
    fine = spec_with({"space": {"train.num_workers": {"sample": "grid", "values": [1, 2, 4]}}})
    space.check_space(fine)


def test_metric_defaults_to_the_task_metric() -> None:
    spec = spec_with({"space": {"train.lr": {"sample": "uniform", "low": 0.1, "high": 1}}})
    assert space.sweep_metric(spec) == ("val_accuracy", "max")
    regression = validate_spec(
        {
            **BASE,
            "data": {**BASE["data"], "task": "regression"},
            "tune": {"space": {"train.lr": {"sample": "uniform", "low": 0.1, "high": 1}}},
        }
    )
    assert space.sweep_metric(regression) == ("val_loss", "min")


def test_param_space_samples_inside_the_bounds() -> None:
    spec = spec_with(
        {
            "space": {
                "train.lr": {"sample": "loguniform", "low": 1e-4, "high": 1e-2},
                "train.seed": {"sample": "randint", "low": 0, "high": 3},
                "model.hidden_sizes": {"sample": "choice", "values": [[8], [16, 8]]},
                "model.dropout": {"sample": "grid", "values": [0.0, 0.5]},
            }
        }
    )
    domains = space.param_space(spec)
    assert domains["model.dropout"] == {"grid_search": [0.0, 0.5]}
    for _ in range(50):
        assert 1e-4 <= domains["train.lr"].sample() <= 1e-2
        assert domains["train.seed"].sample() in (0, 1, 2)
        assert domains["model.hidden_sizes"].sample() in ([8], [16, 8])


def test_search_and_schedulers() -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    lr = {"train.lr": {"sample": "loguniform", "low": 1e-4, "high": 1e-2}}
    assert isinstance(space.search_algorithm(spec_with({"space": lr}), 2), BasicVariantGenerator)
    optuna = spec_with({"space": lr, "search": "optuna"})
    assert isinstance(space.search_algorithm(optuna, 2), OptunaSearch)
    assert isinstance(space.scheduler(spec_with({"space": lr})), FIFOScheduler)
    asha = space.scheduler(
        spec_with(
            {"space": lr, "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 3}},
            train={**BASE["train"], "epochs": 9},
        )
    )
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "epoch" and asha._max_t == 9 and asha._reduction_factor == 3
    pbt = space.scheduler(spec_with({"space": lr, "scheduler": {"kind": "pbt"}}))
    assert isinstance(pbt, PopulationBasedTraining)
    assert list(pbt._hyperparam_mutations) == ["train.lr"]
