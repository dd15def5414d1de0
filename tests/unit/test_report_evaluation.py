"""The evaluation saved with a registered model: per-class scores and the confusion matrix of a
classifier (against scikit-learn), a bounded uniform residual sample of a regressor (against
numpy), merged across workers, and the class labels added at registration."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kiln.train.export import _read_evaluation
from kiln.train.metrics import ClassificationMeter, RegressionMeter, _merge_reservoirs


def test_classification_evaluation_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    classes = 5
    actual = rng.integers(0, classes - 1, 700)  # class 4 never occurs: zero support
    predicted = np.where(rng.random(700) < 0.7, actual, rng.integers(0, classes, 700))
    meter = ClassificationMeter(classes)
    for start in range(0, 700, 128):  # batches, as evaluate() feeds them
        logits = torch.nn.functional.one_hot(torch.tensor(predicted[start : start + 128]), classes)
        meter.update(logits.float(), torch.tensor(actual[start : start + 128]), 0.0)
    evaluation = meter.evaluation()
    assert evaluation["rows"] == 700
    expected_matrix = confusion_matrix(actual, predicted, labels=range(classes))
    assert evaluation["confusion_matrix"] == expected_matrix.tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=range(classes), zero_division=0
    )
    per_class = evaluation["per_class"]
    assert [c["support"] for c in per_class] == support.tolist()
    np.testing.assert_allclose([c["precision"] for c in per_class], precision, atol=1e-12)
    np.testing.assert_allclose([c["recall"] for c in per_class], recall, atol=1e-12)
    np.testing.assert_allclose([c["f1"] for c in per_class], f1, atol=1e-12)
    json.dumps(evaluation)  # a registry document: JSON only


def test_regression_evaluation_errors_and_bounded_sample() -> None:
    rng = np.random.default_rng(1)
    actual = rng.normal(10.0, 4.0, 9_000)
    predicted = actual + rng.normal(0.5, 1.0, 9_000)
    mean, std = 10.0, 4.0
    meter = RegressionMeter(mean, std, sample_size=2_000)
    for start in range(0, 9_000, 1_000):
        pred = torch.tensor((predicted[start : start + 1_000] - mean) / std)
        true = torch.tensor((actual[start : start + 1_000] - mean) / std)
        meter.update(pred, true, 0.0)
    evaluation = meter.evaluation()
    err = predicted - actual
    assert evaluation["rows"] == 9_000
    assert evaluation["mse"] == pytest.approx((err**2).mean(), rel=1e-9)
    assert evaluation["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-9)
    r2 = 1 - (err**2).sum() / ((actual - actual.mean()) ** 2).sum()
    assert evaluation["r2"] == pytest.approx(r2, rel=1e-9)
    sample = evaluation["residual_sample"]
    assert len(sample["actual"]) == len(sample["predicted"]) == 2_000
    # every kept pair is a real (actual, predicted) row, never a mix of two rows
    rows = {round(a, 9): round(p, 9) for a, p in zip(actual, predicted, strict=True)}
    pairs = zip(sample["actual"], sample["predicted"], strict=True)
    assert all(rows[round(a, 9)] == pytest.approx(p, abs=1e-8) for a, p in pairs)
    # uniform over the stream: late rows are as likely as early ones
    index = {round(a, 9): i for i, a in enumerate(actual)}
    late = sum(index[round(a, 9)] >= 4_500 for a in sample["actual"]) / 2_000
    assert 0.45 < late < 0.55
    json.dumps(evaluation)


def test_small_validation_set_is_kept_whole() -> None:
    meter = RegressionMeter(sample_size=2_000)
    meter.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 2.5]), 0.0)
    sample = meter.evaluation()["residual_sample"]
    assert sample == {"actual": [1.5, 2.0, 2.5], "predicted": [1.0, 2.0, 3.0]}


def test_merged_reservoirs_share_by_rows_seen() -> None:
    size = 100
    parts = []
    for worker, seen in enumerate((3_000, 1_000)):
        meter = RegressionMeter(sample_size=size, seed=worker)
        values = torch.full((seen,), float(worker))
        meter.update(values, values, 0.0)
        parts.append(torch.cat([meter.sample, torch.tensor([[float(meter.seen), 0.0]])]))
    merged = _merge_reservoirs(parts, size, torch.Generator().manual_seed(0))
    assert merged.shape == (size, 2)
    assert int((merged[:, 0] == 0).sum()) == 75 and int((merged[:, 0] == 1).sum()) == 25


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    meter = RegressionMeter(sample_size=50)
    values = torch.arange(rank * 1_000, rank * 1_000 + 40 + 300 * rank, dtype=torch.float64)
    meter.update(values, values + 0.5, 0.0)
    dist.all_reduce(meter.state)  # as evaluate() does before asking for the evaluation
    evaluation = meter.evaluation(torch.device("cpu"))
    if rank == 0:
        Path(out).write_text(json.dumps(evaluation))
    dist.destroy_process_group()


def test_residual_sample_is_gathered_across_workers(tmp_path: Path) -> None:
    out = tmp_path / "evaluation.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, init, str(out)), nprocs=2, join=True)
    evaluation = json.loads(out.read_text())
    assert evaluation["rows"] == 40 + 340
    actual = evaluation["residual_sample"]["actual"]
    assert len(actual) == 50
    from_rank_1 = sum(a >= 1_000 for a in actual)
    assert from_rank_1 == round(50 * 340 / 380)  # both workers, in proportion to their rows


def test_registration_adds_class_labels(tmp_path: Path) -> None:
    meter = ClassificationMeter(3)
    meter.update(torch.eye(3), torch.tensor([0, 1, 1]), 0.0)
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"epoch": 2, **meter.evaluation()}))
    preprocessor = SimpleNamespace(label=SimpleNamespace(classes=("cat", "dog", "emu")))
    evaluation = _read_evaluation(path, preprocessor)  # type: ignore[arg-type]
    assert evaluation is not None
    assert evaluation["labels"] == ["cat", "dog", "emu"]
    assert [c["label"] for c in evaluation["per_class"]] == ["cat", "dog", "emu"]
    assert evaluation["per_class"][1] == {
        "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2, "label": "dog"
    }  # fmt: skip
    assert _read_evaluation(tmp_path / "absent.json", preprocessor) is None  # type: ignore[arg-type]
