"""Connect to (or start) Ray, and plan CPUs/GPUs so Ray Data never starves beside training.

On a small machine the failure mode is a silent hang: two training workers take every CPU and
Ray Data's read tasks wait forever. The plan reserves `train.data_cpus` for Ray Data and sizes
the workers from what is left, or refuses with the numbers when it cannot fit.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from kiln.config.spec import TrainSpec
from kiln.errors import KilnError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcePlan:
    worker_resources: dict[str, float]
    """Ray resources each training worker asks for."""
    data_task_cpus: float
    """CPUs each Ray Data read/preprocess task asks for."""
    cluster_cpus: float
    cluster_gpus: float

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"per worker {self.worker_resources}, Ray Data tasks {self.data_task_cpus} CPU each, "
            f"cluster {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU"
        )


def local_resources(address: str | None = None) -> tuple[float, float] | None:
    """(CPUs, GPUs) of the local Ray that `connect(address)` would start, known before starting
    it, so an impossible plan is refused without waiting for Ray; None when kiln joins a running
    Ray or a cluster (`address`, RAY_ADDRESS)."""
    import ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        return None
    return float(os.cpu_count() or 2), float(_local_gpus())


def _local_gpus() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local one.

    A local Ray gets this machine's CPUs; kiln plans fractional CPUs for workers and data tasks
    so nothing over-subscribes them.
    """
    import ray

    if ray.is_initialized():
        _quiet_data_progress()
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        _quiet_data_progress()
        return
    # "local": never attach by surprise to some other `ray start` cluster on this machine.
    ray.init(
        address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=True
    )
    _quiet_data_progress()


def _quiet_data_progress() -> None:
    """Ray Data's progress bars only on a terminal: in logs they are pages of escape codes."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = False


def plan_training(train: TrainSpec, *, cluster_cpus: float, cluster_gpus: float) -> ResourcePlan:
    """Size training workers and Ray Data tasks to fit the cluster together.

    Raises:
        KilnError: the workers plus Ray Data's reserve cannot fit, with the numbers.
    """
    needed_gpus = (train.num_workers if train.use_gpu else 0) * (
        (train.resources_per_worker or {}).get("GPU", 1.0)
    )
    if needed_gpus > cluster_gpus:
        raise KilnError(
            f"train.num_workers={train.num_workers} with use_gpu needs {needed_gpus:g} GPUs; "
            f"the cluster has {cluster_gpus:g}"
        )
    data_task_cpus = round(min(0.5, train.data_cpus / 2), 3)
    if train.resources_per_worker is not None:
        worker = dict(train.resources_per_worker)
    else:
        free = cluster_cpus - train.data_cpus
        worker = {"CPU": round(min(1.0, free / train.num_workers), 3)}
        if train.use_gpu:
            worker["GPU"] = 1.0
    total_cpus = worker.get("CPU", 0.0) * train.num_workers + train.data_cpus
    if worker.get("CPU", 0.0) <= 0 or total_cpus > cluster_cpus + 1e-9:
        raise KilnError(
            f"train: {train.num_workers} workers x {worker.get('CPU', 0.0):g} CPU + "
            f"{train.data_cpus:g} CPU for Ray Data (train.data_cpus) = {total_cpus:g} CPUs, "
            f"but the cluster has {cluster_cpus:g}; lower train.num_workers or "
            "train.resources_per_worker, or add nodes"
        )
    return ResourcePlan(worker, data_task_cpus, cluster_cpus, cluster_gpus)


TRIAL_DRIVER_CPUS = 0.01
"""What each Tune trial's own actor asks for: it only drives its TorchTrainer (0 is refused)."""


@dataclass(frozen=True)
class SweepPlan:
    trial: ResourcePlan
    """Each trial's training workers and Ray Data tasks."""
    num_workers: int
    """Training workers per trial."""
    data_cpus: float
    """CPUs kept free per running trial for its Ray Data reading."""
    concurrent_trials: int
    """Trials running at once."""
    cluster_cpus: float
    cluster_gpus: float

    @property
    def trial_cpus(self) -> float:
        """CPUs one running trial accounts for: workers, Ray Data's reserve, the trial actor."""
        workers = self.trial.worker_resources.get("CPU", 0.0) * self.num_workers
        return workers + self.data_cpus + TRIAL_DRIVER_CPUS

    @property
    def trial_gpus(self) -> float:
        return self.trial.worker_resources.get("GPU", 0.0) * self.num_workers

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"{self.concurrent_trials} concurrent trials x ({self.num_workers} workers x "
            f"{self.trial.worker_resources} + {self.data_cpus:g} CPU for Ray Data) = "
            f"{self.trial_cpus * self.concurrent_trials:.2f} of {self.cluster_cpus:g} CPUs"
        )


def plan_sweep(
    train: TrainSpec,
    *,
    num_trials: int,
    max_concurrent_trials: int | None,
    cluster_cpus: float,
    cluster_gpus: float,
) -> SweepPlan:
    """Size a sweep: each trial's workers as for one training run, and as many concurrent
    trials as fit with Ray Data's reserve beside every one of them, so no trial's reading can
    starve behind another trial's workers.

    Args:
        num_trials: trials the sweep will run at most (no point planning more at once).
        max_concurrent_trials: what the spec asks for; None sizes it to the cluster.

    Raises:
        KilnError: one trial alone cannot fit, or the concurrency asked for cannot, with the
            numbers.
    """
    trial = plan_training(
        train, cluster_cpus=cluster_cpus - TRIAL_DRIVER_CPUS, cluster_gpus=cluster_gpus
    )
    plan = SweepPlan(trial, train.num_workers, train.data_cpus, 1, cluster_cpus, cluster_gpus)
    fits = int((cluster_cpus + 1e-9) // plan.trial_cpus)
    if plan.trial_gpus > 0:
        fits = min(fits, int((cluster_gpus + 1e-9) // plan.trial_gpus))
    if max_concurrent_trials is not None and max_concurrent_trials > fits:
        raise KilnError(
            f"tune.max_concurrent_trials={max_concurrent_trials}: each trial takes "
            f"{plan.trial_cpus:.2f} CPUs ({train.num_workers} workers x "
            f"{trial.worker_resources.get('CPU', 0.0):g} CPU + {train.data_cpus:g} for Ray Data "
            f"+ {TRIAL_DRIVER_CPUS} for the trial) and {plan.trial_gpus:g} GPUs, so "
            f"{max_concurrent_trials} need {plan.trial_cpus * max_concurrent_trials:.2f} CPUs "
            f"and {plan.trial_gpus * max_concurrent_trials:g} GPUs; the cluster has "
            f"{cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs, room for {fits}"
        )
    concurrent = max(1, min(max_concurrent_trials or fits, fits, num_trials))
    return SweepPlan(
        trial, train.num_workers, train.data_cpus, concurrent, cluster_cpus, cluster_gpus
    )
