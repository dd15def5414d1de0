"""The GPU code paths (nccl, bf16, ZeRO-3, fused Adam), selected by the spec. Skipped without a
CUDA GPU; run them on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.registry import Registry
from kiln.registry.model import load_model
from kiln.train.run import run
from tests.integration.test_training import digits_spec

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_zero3_on_one_gpu(fused: bool, digits_dir: Path, tmp_path: Path) -> None:
    spec = digits_spec(
        digits_dir,
        tmp_path,
        epochs=6,
        num_workers=1,
        use_gpu=True,
        resources_per_worker={"CPU": 1, "GPU": 1},
        deepspeed={"zero_stage": 3, "precision": "bf16", "fused_optimizer": fused},
    )
    outcome = run(spec)
    assert outcome.metrics["val_accuracy"] >= 0.9, outcome.history
    registered = load_model(Registry(spec.registry), outcome.model.ref)
    assert all(t.dtype.is_floating_point for t in registered.module.state_dict().values())
