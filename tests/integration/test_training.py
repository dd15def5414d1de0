"""Real DeepSpeed training on a local Ray (gloo, CPU): parity with plain PyTorch, ZeRO stages,
consolidated weights, and recovery from a killed worker."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch

from kiln.config import JobSpec, validate_spec
from kiln.models import build_model
from kiln.registry import Registry
from kiln.registry.model import load_model
from kiln.report import build_report
from kiln.tracking import open_store
from kiln.train.engine import warmup_cosine
from kiln.train.metrics import RESIDUAL_SAMPLE_SIZE
from kiln.train.run import TrainOutcome, run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def digits_spec(digits_dir: Path, tmp_path: Path, **train: Any) -> JobSpec:
    """The digits job with small defaults; keyword arguments override `train.*`."""
    deepspeed = train.pop("deepspeed", {})
    return validate_spec(
        {
            "name": "digits-test",
            "data": {
                "train": str(digits_dir / "train"),
                "validation": str(digits_dir / "test"),
                "label": "label",
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": [64]},
            "train": {
                "epochs": 6,
                "batch_size": 64,
                "lr": 0.003,
                "warmup_steps": 5,
                "num_workers": 2,
                "storage": str(tmp_path / "runs"),
                "log_every": 1000,
                "deepspeed": {"zero_stage": 2, **deepspeed},
                **train,
            },
            "registry": str(tmp_path / "registry"),
        }
    )


def reference_losses(spec: JobSpec, outcome: TrainOutcome) -> list[float]:
    """Plain PyTorch: same seed, same preprocessed rows in the same order, same AdamW, schedule
    and clipping. Returns the mean training loss of each epoch."""
    registered = load_model(Registry(spec.registry), outcome.model.ref)
    files = sorted(Path(spec.data.train).glob("*.parquet"))
    table = pq.read_table(files)
    arrays = registered.preprocessor.transform(table)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, registered.preprocessor.input_schema())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay
    )
    steps_per_epoch = math.ceil(len(y) / spec.train.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(spec.train.warmup_steps, spec.train.epochs * steps_per_epoch)
    )
    losses = []
    for _ in range(spec.train.epochs):
        total = 0.0
        for start in range(0, len(y), spec.train.batch_size):
            xb, yb = (
                x[start : start + spec.train.batch_size],
                y[start : start + spec.train.batch_size],
            )
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.deepspeed.grad_clip)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(yb)
        losses.append(total / len(y))
    return losses


def test_one_worker_zero0_matches_plain_pytorch(digits_dir: Path, tmp_path: Path) -> None:
    spec = digits_spec(
        digits_dir,
        tmp_path,
        epochs=3,
        num_workers=1,
        shuffle=False,
        deepspeed={"zero_stage": 0, "precision": "fp32"},
    )
    outcome = run(spec)
    kiln_losses = [epoch["train_loss"] for epoch in outcome.history]
    expected = reference_losses(spec, outcome)
    assert len(kiln_losses) == spec.train.epochs
    np.testing.assert_allclose(kiln_losses, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_reach_the_accuracy_band(stage: int, digits_dir: Path, tmp_path: Path) -> None:
    spec = digits_spec(digits_dir, tmp_path, epochs=8, deepspeed={"zero_stage": stage})
    outcome = run(spec)
    assert outcome.metrics["val_accuracy"] >= 0.93, outcome.history
    assert [epoch["epoch"] for epoch in outcome.history] == list(range(1, 9))
    if stage == 3:
        check_registered_weights_reproduce_engine(spec, outcome, digits_dir)


def check_registered_weights_reproduce_engine(
    spec: JobSpec, outcome: TrainOutcome, digits_dir: Path
) -> None:
    """The ZeRO-3 run's model.safetensors, loaded strictly into the bare module, gives the same
    validation loss and accuracy the sharded engine reported for that checkpoint."""
    registered = load_model(Registry(spec.registry), outcome.model.ref)
    assert isinstance(registered.module, torch.nn.Module)
    table = pq.read_table(sorted((digits_dir / "test").glob("*.parquet")))
    arrays = registered.preprocessor.transform(table)
    with torch.inference_mode():
        logits = registered.module(torch.from_numpy(arrays["x"]))
    target = torch.from_numpy(arrays["y"])
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    accuracy = (logits.argmax(1) == target).double().mean().item()
    assert accuracy == pytest.approx(outcome.metrics["val_accuracy"], abs=1e-9)
    assert loss == pytest.approx(outcome.metrics["val_loss"], abs=1e-5)


def _committed_checkpoints(run_root: Path) -> int:
    for snapshot in run_root.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
        except (OSError, ValueError):  # being written
            return 0
    return 0


def _kill_a_worker_after_first_checkpoint(run_root: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not killed:
        # Ray Train's controller registers a reported checkpoint when it next polls the
        # workers and records it in this snapshot; a folder alone may not be committed yet.
        if _committed_checkpoints(run_root) >= 1:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if "RayTrainWorker" in cmdline:
                    proc.kill()
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.2)


def test_killed_worker_resumes_from_last_checkpoint(digits_dir: Path, tmp_path: Path) -> None:
    # Digits epochs take well under a second once the data is cached: enough epochs that the
    # kill after the first checkpoint lands while training still has epochs to run.
    spec = digits_spec(digits_dir, tmp_path, epochs=12, max_failures=2)
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint, args=(tmp_path / "runs", killed)
    )
    killer.start()
    outcome = run(spec)
    killer.join()
    assert killed, "no training worker was found to kill"
    resumed = [epoch["resumed_from_epoch"] for epoch in outcome.history]
    assert max(resumed) >= 1, outcome.history  # later epochs ran after a resume
    assert [epoch["epoch"] for epoch in outcome.history] == list(range(1, 13))
    assert outcome.model.ref == "digits-test:1"
    assert outcome.metrics["val_accuracy"] >= 0.9


def test_regression_with_categoricals_split_and_dedupe(tmp_path: Path) -> None:
    """The other half of the spec: regression, index-encoded categoricals with embeddings,
    median fill, a hash validation split and de-duplication, on ZeRO-1."""
    from kiln.data.examples import write_synth

    data = tmp_path / "synth"
    write_synth(
        data,
        rows=3000,
        features=6,
        task="regression",
        categorical=2,
        missing_fraction=0.05,
        shards=3,
        test_fraction=0.1,
        seed=3,
    )
    train_dir = data / "train"
    # Duplicate one shard: dedupe must bring the row count back.
    first = sorted(train_dir.glob("*.parquet"))[0]
    (train_dir / "part-dup.parquet").write_bytes(first.read_bytes())
    spec = validate_spec(
        {
            "name": "synth-reg",
            "data": {
                "train": str(train_dir),
                "validation_split": 0.2,
                "label": "label",
                "task": "regression",
                "preprocess": {"dedupe": True, "missing": "median", "categorical": "index"},
            },
            "model": {"hidden_sizes": [64, 32], "embedding_dim": 4},
            "train": {
                "epochs": 8,
                "batch_size": 64,
                "lr": 0.003,
                "num_workers": 2,
                "storage": (tmp_path / "runs").as_uri(),  # URIs work as well as paths
                "deepspeed": {"zero_stage": 1},
            },
            "registry": (tmp_path / "registry").as_uri(),
        }
    )
    outcome = run(spec)
    assert outcome.metrics["val_r2"] > 0.5, outcome.history
    assert spec.metric == "val_loss"
    registered = load_model(Registry(spec.registry), outcome.model.ref)
    schema = registered.preprocessor.input_schema()
    assert len(schema["categorical_cardinalities"]) == 2
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in train_dir.glob("part-0*.parquet"))
    assert outcome.history and rows > 0
    documents = Registry(spec.registry).show(outcome.model.ref)["documents"]
    lineage = documents["lineage.json"]
    # De-duplicated and split: the training rows are the distinct rows on the training side.
    assert lineage["data"]["train_rows"] < rows * 0.85
    # evaluation.json is the registered epoch's: its MSE is that epoch's val_mse, and it keeps
    # (actual, predicted) pairs of every validation row (fewer than the 2,000 cap here).
    evaluation, best = documents["evaluation.json"], documents["metrics.json"]["best"]
    assert evaluation["epoch"] == best["epoch"]
    assert evaluation["mse"] == pytest.approx(best["val_mse"], rel=1e-9)
    sample = evaluation["residual_sample"]
    assert 0 < evaluation["rows"] < RESIDUAL_SAMPLE_SIZE
    assert len(sample["actual"]) == len(sample["predicted"]) == evaluation["rows"]
    # The tracked run renders a report with the residual plot.
    record = open_store().list(kind="train")[0]
    assert record.model == outcome.model.ref
    page, report = build_report(open_store().get(record.run_id), tmp_path / "report.html")
    assert [f.name for f in report.figures] == ["loss", "metrics", "residuals", "throughput"]
    assert f"all {evaluation['rows']} rows" in page.read_text()
