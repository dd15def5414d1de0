"""`kiln tune` (sweeps) and `kiln plan` (what a job will use, and whether it fits)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kiln.cli.train_cmd import OVERRIDES_HELP


def add_commands(commands: Any) -> None:
    """Register `tune` and `plan` on the top-level subparsers."""
    tune = commands.add_parser(
        "tune",
        help="sweep hyperparameters with Ray Tune and register the best model",
        description="Run the job spec's `tune` sweep: every trial trains with the same DeepSpeed "
        "TorchTrainer as `kiln train`, with the swept spec paths set to sampled values. Prints "
        "a live trial table, writes results.csv/.parquet and PNG plots into the sweep "
        "directory, and registers the best trial's best checkpoint.",
    )
    tune.add_argument("spec", nargs="?", help="YAML job spec with a `tune` section")
    tune.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    tune.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted sweep: finished trials are kept, unfinished ones "
        "continue from their latest checkpoint",
    )
    tune.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    tune.set_defaults(handler=_tune)

    plan = commands.add_parser(
        "plan",
        help="show the CPUs, GPUs and memory a job will use, and whether it fits",
        description="Plan Ray Data's reserve, the training workers and (with a `tune` section) "
        "the concurrent trials against this machine or a running cluster. Exits 2 with the "
        "numbers when the job cannot be scheduled.",
    )
    plan.add_argument("spec", help="YAML job spec")
    plan.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    plan.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="plan against a running Ray cluster (default: this machine, as a local Ray gets it)",
    )
    plan.set_defaults(handler=_plan)


def _tune(args: argparse.Namespace) -> int:
    from kiln.cli.train_cmd import _shutdown_ray
    from kiln.config import load_spec
    from kiln.errors import KilnError
    from kiln.tune import run
    from kiln.tune.results import format_table
    from kiln.tune.space import sweep_metric

    if args.resume and args.spec:
        raise KilnError("give a spec or --resume RUN_DIR, not both")
    if not args.resume and not args.spec:
        raise KilnError("kiln tune needs a job spec with a `tune` section (or --resume RUN_DIR)")
    spec = load_spec(args.spec, args.overrides) if args.spec else None
    try:
        outcome = run(spec, resume=args.resume, address=args.address)
    finally:
        _shutdown_ray()
    spec_used = _sweep_spec(outcome.sweep_dir)
    assert spec_used.tune is not None
    metric, mode = sweep_metric(spec_used)
    print(format_table(outcome.rows, list(spec_used.tune.space), metric))
    values = {path: outcome.best.get(path) for path in spec_used.tune.space}
    print(
        f"best trial {outcome.best['trial']}: {metric} {outcome.best['checkpoint_metric']:.4f} "
        f"({mode}) at epoch {outcome.best['best_epoch']} with {json.dumps(values)}"
    )
    print(f"registered {outcome.model.ref}")
    print(f"sweep dir: {outcome.sweep_dir}")
    for path in outcome.files.values():
        print(f"wrote {path}")
    return 0


def _sweep_spec(sweep_dir: str) -> Any:
    from kiln.tune.sweep import _load_sweep

    return _load_sweep(sweep_dir)[0]


def _plan(args: argparse.Namespace) -> int:
    from kiln.cluster import plan_training
    from kiln.config import load_spec

    spec = load_spec(args.spec, args.overrides)
    cpus, gpus, memory, where = _cluster(args.cluster)
    print(f"cluster: {cpus:g} CPUs, {gpus:g} GPUs, {memory / 2**30:.1f} GiB memory ({where})")
    train = plan_training(spec.train, cluster_cpus=cpus, cluster_gpus=gpus)
    print(
        f"ray data: {spec.train.data_cpus:g} CPU kept free beside training (train.data_cpus); "
        f"read/preprocess tasks ask {train.data_task_cpus:g} CPU each; its blocks live in the "
        f"object store (about 30% of memory on a local Ray: {0.3 * memory / 2**30:.1f} GiB)"
    )
    used = train.worker_resources.get("CPU", 0.0) * spec.train.num_workers + spec.train.data_cpus
    print(
        f"train: {spec.train.num_workers} workers x {train.worker_resources} "
        f"-> {used:g} of {cpus:g} CPUs with Ray Data's reserve: fits"
    )
    if spec.tune is not None:
        from kiln.tune.sweep import plan_for_cluster

        sweep = plan_for_cluster(spec, cpus, gpus)
        print(f"tune: {spec.tune.num_samples} samples; {sweep.describe()}: fits")
    print("plan ok")
    return 0


def _cluster(address: str | None) -> tuple[float, float, float, str]:
    """(CPUs, GPUs, memory bytes, description) of a running cluster or of this machine."""
    if address:
        import ray

        from kiln.cli.train_cmd import _shutdown_ray
        from kiln.cluster import connect

        connect(address)
        try:
            res = ray.cluster_resources()
        finally:
            _shutdown_ray()
        return (
            float(res.get("CPU", 0.0)),
            float(res.get("GPU", 0.0)),
            float(res.get("memory", 0.0)),
            f"Ray cluster at {address}",
        )
    memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return float(os.cpu_count() or 1), float(_local_gpus()), memory, "this machine"


def _local_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
