"""`kiln retrain` on a CUDA GPU without Ray: registered weights load into the model each worker
builds, frozen prefixes stay out of the optimizer, and after bf16 ZeRO-3 steps (torch AdamW and
DeepSpeed's fused Adam) the consolidated weights keep the frozen tensors at the registered values
while the others move. Skipped without a GPU; the 2-worker CPU path is in
tests/integration/test_retrain.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.config.spec import ModelSpec, TrainSpec
from kiln.models import build_model
from kiln.registry import Registry
from kiln.train.engine import build_engine, full_state_dict
from kiln.train.warmstart import apply_warm_start, warm_start_config

pytestmark = pytest.mark.gpu

SCHEMA = {
    "task": "classification",
    "num_inputs": 16,
    "categorical_cardinalities": [],
    "num_classes": 4,
}
MODEL = {"kind": "tabular_mlp", "hidden_sizes": [32, 32]}


def _registered(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A seeded model registered with the documents a real registration writes."""
    torch.manual_seed(1)
    model = build_model(ModelSpec.model_validate(MODEL), SCHEMA)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    documents = {
        "model.json": {"kind": "tabular_mlp", "options": MODEL, "input_schema": SCHEMA},
        "preprocessing.json": {},
        "metrics.json": {},
        "lineage.json": {},
    }
    root = str(tmp_path / "registry")
    Registry(root).register("warm", weights, documents)
    return root, weights


@pytest.mark.parametrize("fused", [False, True])
def test_warm_start_and_frozen_prefix_under_bf16_zero3(
    nccl: None, tmp_path: Path, fused: bool
) -> None:
    root, registered = _registered(tmp_path)
    torch.manual_seed(2)  # a different init: the warm start must replace it
    model = build_model(ModelSpec.model_validate(MODEL), SCHEMA)
    frozen = apply_warm_start(model, warm_start_config(root, "warm:1", ["blocks.0"]))
    assert frozen and all(name.startswith("blocks.0.") for name in frozen)
    spec = TrainSpec.model_validate(
        {
            "batch_size": 64,
            "num_workers": 1,
            "lr": 1e-2,
            "use_gpu": True,
            "deepspeed": {"zero_stage": 3, "precision": "bf16", "fused_optimizer": fused},
        }
    )
    engine = build_engine(model, spec, total_steps=10)
    x, y = torch.randn(64, 16).cuda(), torch.randint(0, 4, (64,)).cuda()
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(engine(x.bfloat16()).float(), y)
        engine.backward(loss)
        engine.step()
    state = full_state_dict(engine)
    assert set(state) == set(registered)
    for name, before in registered.items():
        as_trained = before.to(torch.bfloat16).float()  # bf16 training holds bf16 weights
        if name in frozen:
            assert torch.equal(state[name], as_trained), name
        else:
            assert not torch.equal(state[name], as_trained), name
