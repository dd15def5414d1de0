"""The sweep planner: concurrent trials sized so every trial's Ray Data keeps a CPU, and plans
that cannot be scheduled refused with the numbers."""

from __future__ import annotations

import pytest

from kiln.cli.main import main
from kiln.cluster import plan_sweep
from kiln.config import TrainSpec
from kiln.errors import KilnError


def test_two_cpus_run_one_trial_at_a_time_with_a_cpu_for_ray_data() -> None:
    plan = plan_sweep(
        TrainSpec(num_workers=2, batch_size=64),
        num_trials=8,
        max_concurrent_trials=None,
        cluster_cpus=2,
        cluster_gpus=0,
    )
    assert plan.concurrent_trials == 1
    workers = plan.trial.worker_resources["CPU"] * 2
    assert workers + 1.0 + 0.01 <= 2.0 + 1e-9  # workers + Ray Data's reserve + the trial actor
    assert plan.trial_cpus * plan.concurrent_trials <= 2.0 + 1e-9


def test_bigger_cluster_runs_trials_side_by_side_never_more_than_the_trials() -> None:
    train = TrainSpec(num_workers=2, batch_size=64, resources_per_worker={"CPU": 1})
    plan = plan_sweep(
        train, num_trials=8, max_concurrent_trials=None, cluster_cpus=16, cluster_gpus=0
    )
    assert plan.concurrent_trials == 5  # 16 // (2 x 1 + 1 + 0.01)
    assert (
        plan_sweep(
            train, num_trials=3, max_concurrent_trials=None, cluster_cpus=16, cluster_gpus=0
        ).concurrent_trials
        == 3
    )
    assert (
        plan_sweep(
            train, num_trials=8, max_concurrent_trials=2, cluster_cpus=16, cluster_gpus=0
        ).concurrent_trials
        == 2
    )


def test_gpus_bound_the_concurrent_trials() -> None:
    train = TrainSpec(
        num_workers=2, batch_size=64, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1}
    )
    plan = plan_sweep(
        train, num_trials=8, max_concurrent_trials=None, cluster_cpus=32, cluster_gpus=4
    )
    assert plan.concurrent_trials == 2


def test_a_trial_bigger_than_the_cluster_is_refused_with_the_numbers() -> None:
    train = TrainSpec(num_workers=2, batch_size=64, resources_per_worker={"CPU": 4})
    with pytest.raises(
        KilnError,
        match=r"2 workers x 4 CPU \+ 1 CPU for Ray Data .* = 9 CPUs, but the cluster has 1.99",
    ):
        plan_sweep(train, num_trials=4, max_concurrent_trials=None, cluster_cpus=2, cluster_gpus=0)
    gpu = TrainSpec(num_workers=2, batch_size=64, use_gpu=True)
    with pytest.raises(KilnError, match=r"needs 2 GPUs; the cluster has 0"):
        plan_sweep(gpu, num_trials=4, max_concurrent_trials=None, cluster_cpus=2, cluster_gpus=0)


def test_too_many_concurrent_trials_is_refused_with_the_numbers() -> None:
    train = TrainSpec(num_workers=1, batch_size=64, resources_per_worker={"CPU": 0.5})
    with pytest.raises(KilnError) as info:
        plan_sweep(train, num_trials=4, max_concurrent_trials=2, cluster_cpus=2, cluster_gpus=0)
    message = str(info.value)
    assert "tune.max_concurrent_trials=2" in message
    assert "each trial takes 1.51 CPUs" in message and "2 need 3.02 CPUs" in message
    assert "the cluster has 2 CPUs" in message and "room for 1" in message


def test_kiln_plan_prints_the_plan_and_refuses_what_cannot_fit(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "digits-sweep.yaml"
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "ray data: 1 CPU kept free" in out and "concurrent trials" in out
    assert out.strip().endswith("plan ok")
    assert main(["plan", str(spec), "train.resources_per_worker={CPU: 100000}"]) == 2
    err = capsys.readouterr().err
    assert "kiln: error: train: 1 workers x 100000 CPU" in err and "but the cluster has" in err
