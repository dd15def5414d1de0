"""Pure pieces of training: DeepSpeed config, LR schedule, exact metrics, model factory."""

import math
import os

import pytest
import torch

from kiln.config import validate_spec
from kiln.errors import SpecError
from kiln.models import build_model
from kiln.train.engine import deepspeed_config, warmup_cosine
from kiln.train.metrics import ClassificationMeter, RegressionMeter

BASE = {"name": "m", "data": {"train": "d", "validation_split": 0.2, "label": "y"}}
SCHEMA = {
    "task": "classification",
    "num_inputs": 5,
    "num_classes": 3,
    "categorical_cardinalities": [],
}


def test_deepspeed_config_from_spec() -> None:
    spec = validate_spec(
        {
            **BASE,
            "train": {
                "batch_size": 64,
                "num_workers": 2,
                "deepspeed": {
                    "zero_stage": 3,
                    "precision": "bf16",
                    "grad_accum": 2,
                    "grad_clip": 0.5,
                    "offload_optimizer": True,
                    "config": {"zero_optimization": {"reduce_bucket_size": 10}},
                },
            },
        }
    )
    config = deepspeed_config(spec.train)
    assert config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["reduce_bucket_size"] == 10
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["gradient_clipping"] == 0.5
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"]
    fused = validate_spec({**BASE, "train": {"deepspeed": {"fused_optimizer": True}}})
    assert deepspeed_config(fused.train)["optimizer"]["type"] == "AdamW"


def test_warmup_then_cosine() -> None:
    factor = warmup_cosine(warmup_steps=10, total_steps=110)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    assert factor(500) == pytest.approx(0.0, abs=1e-12)


def test_classification_meter_matches_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (200,), generator=generator)
    logits = torch.randn(200, 4, generator=generator) + torch.nn.functional.one_hot(target, 4)
    whole = ClassificationMeter(4)
    halves = [ClassificationMeter(4), ClassificationMeter(4)]
    whole.update(logits, target, loss_sum=2.0)
    halves[0].update(logits[:77], target[:77], loss_sum=1.0)
    halves[1].update(logits[77:], target[77:], loss_sum=1.0)
    halves[0].state += halves[1].state  # what all_reduce(SUM) does across ranks
    predicted = logits.argmax(1).numpy()
    expected = {
        "accuracy": accuracy_score(target, predicted),
        "precision": precision_score(target, predicted, average="macro"),
        "recall": recall_score(target, predicted, average="macro"),
        "f1": f1_score(target, predicted, average="macro"),
    }
    for metrics in (whole.compute(), halves[0].compute()):
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value)
        assert metrics["loss"] == pytest.approx(0.01)


def test_regression_meter_on_original_scale() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    true = torch.linspace(-1, 1, 50)
    pred = true * 0.9 + 0.05
    meter = RegressionMeter(label_mean=10.0, label_std=2.0)
    meter.update(pred, true, loss_sum=0.0)
    metrics = meter.compute()
    true_o, pred_o = (true * 2 + 10).numpy(), (pred * 2 + 10).numpy()
    assert metrics["mse"] == pytest.approx(mean_squared_error(true_o, pred_o), rel=1e-6)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(true_o, pred_o), rel=1e-6)
    assert metrics["r2"] == pytest.approx(r2_score(true_o, pred_o), rel=1e-6)


def test_tabular_mlp_shapes_and_embeddings() -> None:
    spec = validate_spec({**BASE, "model": {"kind": "tabular_mlp", "hidden_sizes": [8]}})
    model = build_model(spec.model, SCHEMA)
    assert model(torch.randn(4, 5)).shape == (4, 3)
    with_cat = build_model(spec.model, {**SCHEMA, "categorical_cardinalities": [4, 6]})
    assert with_cat(torch.randn(4, 5), torch.randint(0, 4, (4, 2))).shape == (4, 3)
    regression = build_model(spec.model, {**SCHEMA, "task": "regression", "num_classes": None})
    assert regression(torch.randn(4, 5)).shape == (4,)
    checkpointed = build_model(spec.model, SCHEMA, activation_checkpointing=True)
    assert checkpointed.checkpointing and not math.isnan(
        checkpointed(torch.randn(2, 5)).sum().item()
    )


def test_model_errors_name_the_field() -> None:
    with pytest.raises(SpecError, match="model.kind: unknown kind 'nope'"):
        build_model(validate_spec({**BASE, "model": {"kind": "nope"}}).model, SCHEMA)
    with pytest.raises(SpecError, match="cannot import"):
        build_model(validate_spec({**BASE, "model": {"kind": "no_such_pkg:f"}}).model, SCHEMA)
    with pytest.raises(SpecError, match=r"model\.hidden_size: unknown option"):
        build_model(validate_spec({**BASE, "model": {"hidden_size": 3}}).model, SCHEMA)


def test_user_factory_is_called_with_spec_and_schema() -> None:
    spec = validate_spec({**BASE, "model": {"kind": "tests.unit.user_model:make", "width": 7}})
    model = build_model(spec.model, SCHEMA)
    assert model(torch.randn(2, 5)).shape == (2, 3)
    assert model.width == 7


def test_fused_optimizer_build_gets_an_arch_list_deepspeed_parses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA images set TORCH_CUDA_ARCH_LIST=9.0a on Hopper; DeepSpeed 0.19's JIT build cannot
    parse `9.0a` (seen on an H200), so kiln builds those entries as plain `9.0`."""
    from kiln.train.engine import _pin_cuda_arch

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;10.0a 9.0")
    _pin_cuda_arch()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0;10.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    _pin_cuda_arch()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
