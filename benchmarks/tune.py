"""ASHA against training every config to full length, on the same 8 sampled configs.

    .venv/bin/python benchmarks/tune.py            # about 8-10 minutes on 2 cores
    .venv/bin/python benchmarks/tune.py --samples 8 --epochs 8

Both sweeps run kiln's own `kiln.tune.run` on the digits data with the same random search
(same seed, so the same 8 configs, checked below): once with the FIFO scheduler (every trial
trains all epochs) and once with ASHA (grace period 1, reduction factor 2). Printed: the best
validation accuracy of each, their ratio, the trial-epochs each used and their ratio. The goal
(issue 4): ASHA's best within 1% of the full sweep's best, with at most half the trial-epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.config import validate_spec
from kiln.data.examples import write_digits
from kiln.tune import SweepOutcome
from kiln.tune import run as tune_run

METRIC_GOAL, EPOCH_GOAL = 0.99, 0.5


def sweep_spec(data: Path, work: Path, *, samples: int, epochs: int, scheduler: str) -> Any:
    """The digits sweep: lr, width and dropout sampled at random, 1 worker per trial."""
    return validate_spec(
        {
            "name": f"bench-{scheduler}",
            "data": {
                "train": str(data / "train"),
                "validation": str(data / "test"),
                "label": "label",
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": [128, 64]},
            "train": {
                "epochs": epochs,
                "batch_size": 64,
                "warmup_steps": 10,
                "num_workers": 1,
                "log_every": 100_000,
                "storage": str(work / "runs"),
                "keep_checkpoints": 1,
            },
            "registry": str(work / "registry"),
            "tune": {
                "metric": "val_accuracy",
                "mode": "max",
                "num_samples": samples,
                "seed": 7,
                "space": {
                    "train.lr": {"sample": "loguniform", "low": 1e-4, "high": 3e-2},
                    "model.hidden_sizes": {"sample": "choice", "values": [[32], [128, 64]]},
                    "model.dropout": {"sample": "uniform", "low": 0.0, "high": 0.5},
                },
                "scheduler": {"kind": scheduler, "grace_period": 1, "reduction_factor": 2},
            },
        }
    )


def summary(outcome: SweepOutcome, seconds: float) -> dict[str, Any]:
    rows = outcome.rows
    return {
        "best_val_accuracy": max(row["val_accuracy"] for row in rows),
        "trial_epochs": sum(row["epochs"] for row in rows),
        "stopped_early": sum(row["status"] == "stopped early" for row in rows),
        "seconds": round(seconds, 1),
        "configs": [
            json.dumps([row[p] for p in ("train.lr", "model.hidden_sizes", "model.dropout")])
            for row in rows
        ],
        "registered": outcome.model.ref,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[bench] %(message)s", stream=sys.stderr)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    with tempfile.TemporaryDirectory(prefix="kiln-bench-tune-") as tmp:
        work = Path(tmp)
        write_digits(work / "digits", shards=4, seed=0, overwrite=True)
        figures = {}
        try:
            for scheduler in ("fifo", "asha"):
                spec = sweep_spec(
                    work / "digits",
                    work,
                    samples=args.samples,
                    epochs=args.epochs,
                    scheduler=scheduler,
                )
                start = time.perf_counter()
                outcome = tune_run(spec)
                figures[scheduler] = summary(outcome, time.perf_counter() - start)
        finally:
            if ray.is_initialized():
                ray.shutdown()
    full, asha = figures["fifo"], figures["asha"]
    same = sorted(full["configs"]) == sorted(asha["configs"])
    metric_ratio = asha["best_val_accuracy"] / full["best_val_accuracy"]
    epoch_ratio = asha["trial_epochs"] / full["trial_epochs"]
    print(f"configs: {args.samples} sampled, {args.epochs} epochs max; identical in both: {same}")
    for name, fig in (("full length (FIFO)", full), ("ASHA", asha)):
        print(
            f"{name:>18}: best val_accuracy {fig['best_val_accuracy']:.4f}, "
            f"{fig['trial_epochs']} trial-epochs, {fig['stopped_early']} stopped early, "
            f"{fig['seconds']:.0f} s"
        )
    print(
        f"ASHA / full: best val_accuracy ratio {metric_ratio:.4f} (goal >= {METRIC_GOAL}), "
        f"trial-epochs ratio {epoch_ratio:.3f} (goal <= {EPOCH_GOAL})"
    )
    ok = same and metric_ratio >= METRIC_GOAL and epoch_ratio <= EPOCH_GOAL
    print("goal met" if ok else "goal NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
