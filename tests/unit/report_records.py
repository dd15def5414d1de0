"""Hand-built run records (and a registered model with an evaluation) for the report tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.registry import Registry
from kiln.tracking.record import RunRecord

START = 1_795_000_000.0
DIGITS = [str(d) for d in range(10)]


def _curve(values: list[float]) -> list[tuple[int, float]]:
    return [(epoch, value) for epoch, value in enumerate(values, start=1)]


def classification_evaluation(seed: int = 0, rows: int = 360) -> dict[str, Any]:
    """A confusion matrix of a mostly right 10-class classifier, as evaluation.json holds it."""
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, 10, rows)
    predicted = np.where(rng.random(rows) < 0.9, actual, rng.integers(0, 10, rows))
    matrix = np.zeros((10, 10), dtype=int)
    np.add.at(matrix, (actual, predicted), 1)
    per_class = []
    for k in range(10):
        tp, pred, act = matrix[k, k], matrix[:, k].sum(), matrix[k].sum()
        precision = tp / pred if pred else 0.0
        recall = tp / act if act else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(
            {"precision": precision, "recall": recall, "f1": f1, "support": int(act), "label": k}
        )
    return {
        "epoch": 3,
        "task": "classification",
        "rows": rows,
        "confusion_matrix": matrix.tolist(),
        "per_class": [
            {k: v if k in ("support", "label") else float(v) for k, v in c.items()}
            for c in per_class
        ],
        "labels": list(range(10)),
    }


def regression_evaluation(rows: int = 500) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    actual = rng.normal(50.0, 10.0, rows)
    predicted = actual + rng.normal(0.0, 3.0, rows)
    err = predicted - actual
    return {
        "epoch": 4,
        "task": "regression",
        "rows": rows,
        "mse": float((err**2).mean()),
        "mae": float(np.abs(err).mean()),
        "r2": float(1 - (err**2).sum() / ((actual - actual.mean()) ** 2).sum()),
        "residual_sample": {"actual": actual.tolist(), "predicted": predicted.tolist()},
    }


def register_model(root: Path, name: str, evaluation: dict[str, Any] | None) -> str:
    """A registered version holding the documents the report reads; returns `name:version`."""
    documents: dict[str, dict[str, Any]] = {"metrics.json": {"metric": "val_accuracy"}}
    if evaluation is not None:
        documents["evaluation.json"] = evaluation
    version = Registry(str(root)).register(name, {"w": torch.zeros(2)}, documents)
    return version.ref


def train_record(model: str | None = "digits-mlp:1", *, task: str = "classification") -> RunRecord:
    params = {"data.task": task, "train.lr": "0.003", "train.epochs": "3", "model.kind": "mlp"}
    metrics: dict[str, list[tuple[int, float]]] = {
        "train_loss": _curve([1.9, 0.6, 0.3]),
        "val_loss": _curve([1.1, 0.45, 0.35]),
        "samples_per_s": _curve([5200.0, 6100.0, 6050.0]),
        "lr": _curve([0.003, 0.0015, 0.0]),
    }
    if task == "classification":
        metrics |= {
            "val_accuracy": _curve([0.71, 0.91, 0.95]),
            "val_f1": _curve([0.69, 0.90, 0.949]),
            "val_precision": _curve([0.72, 0.91, 0.95]),
            "val_recall": _curve([0.70, 0.905, 0.948]),
        }
    else:
        metrics |= {
            "val_mse": _curve([40.0, 15.0, 9.5, 9.1]),
            "val_mae": _curve([5.0, 3.1, 2.45, 2.4]),
            "val_r2": _curve([0.6, 0.85, 0.905, 0.909]),
        }
    tags = {"kiln.run_dir": "/tmp/runs/digits-mlp-1"}
    if model:
        tags["kiln.model"] = model
    return RunRecord(
        "a1b2c3d4e5f6",
        "train",
        model.split(":")[0] if model else "digits-mlp",
        "FINISHED",
        START,
        START + 95.0,
        params,
        tags,
        metrics,
    )


def lm_record() -> RunRecord:
    val = [14.0, 8.2, 6.1, 5.3]
    return RunRecord(
        "lm0123456789",
        "train",
        "tiny-gpt",
        "FINISHED",
        START,
        START + 215.0,
        {"data.task": "language_modeling"},
        {"kiln.model": "tiny-gpt:1"},
        {
            "train_loss": _curve([math.log(v * 1.1) for v in val]),
            "val_loss": _curve([math.log(v) for v in val]),
            "train_perplexity": _curve([v * 1.1 for v in val]),
            "val_perplexity": _curve(val),
            "val_unigram_perplexity": _curve([25.57] * 4),
            "tokens_per_s": _curve([19000.0, 20500.0, 20800.0, 20700.0]),
            "samples_per_s": _curve([148.0, 160.0, 162.0, 161.0]),
        },
    )


def sweep_records(model: str | None = "digits-mlp:2") -> tuple[RunRecord, list[RunRecord]]:
    parent = RunRecord(
        "sweep0000001",
        "tune",
        "digits-mlp",
        "FINISHED",
        START,
        START + 420.0,
        {
            "data.task": "classification",
            "tune.metric": "val_accuracy",
            "tune.space.train.lr.sample": "loguniform",
        },
        {"kiln.model": model} if model else {},
    )
    trials = []
    for index, (lr, hidden, curve) in enumerate(
        [
            (0.0003, "[64]", [0.52, 0.71, 0.80, 0.85]),
            (0.003, "[128]", [0.78, 0.92, 0.95, 0.963]),
            (0.03, "[64]", [0.60, 0.66]),
            (0.01, "[128]", [0.74, 0.90, 0.94, 0.955]),
        ]
    ):
        trials.append(
            RunRecord(
                f"trial{index:07d}",
                "trial",
                f"trial_{index}",
                "FINISHED" if len(curve) == 4 else "KILLED",
                START + index,
                START + 100 * index,
                {
                    "data.task": "classification",
                    "train.lr": str(lr),
                    "model.hidden": hidden,
                    "train.epochs": "4",
                },
                {"kiln.parent_run_id": parent.run_id, "kiln.trial_id": f"trial_{index}"},
                {
                    "val_accuracy": _curve(curve),
                    "val_loss": _curve([1.5 - v for v in curve]),
                    "train_loss": _curve([1.6 - v for v in curve]),
                    "samples_per_s": _curve([5000.0 + 100 * e for e in range(len(curve))]),
                },
            )
        )
    return parent, trials


def score_record() -> RunRecord:
    return RunRecord(
        "score0000001",
        "score",
        "/tmp/scored",
        "FINISHED",
        START,
        START + 12.5,
        {"model": "digits-mlp@production"},
        {"kiln.model": "digits-mlp:2"},
        {
            "rows_in": [(0, 360.0)],
            "rows_out": [(0, 356.0)],
            "rows_quarantined": [(0, 4.0)],
            "rows_per_s": [(0, 28.8)],
            "seconds": [(0, 12.5)],
        },
    )


class FakeStore:
    """The part of the tracking store the report asks: a sweep's trials."""

    def __init__(self, children: dict[str, list[RunRecord]]) -> None:
        self._children = children

    def children(self, run_id: str) -> list[RunRecord]:
        return self._children.get(run_id, [])
