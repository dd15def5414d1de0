"""Language models on a CUDA GPU without Ray: the DeepSpeed engine kiln builds (nccl, bf16,
ZeRO-3, fused or torch Adam, activation checkpointing) trains a causal_lm and an hf_causal_lm,
the consolidated weights register, and the predictor generates the same greedy text on the GPU
as on the CPU. Skipped without a GPU; the 2-worker Ray paths are in tests/integration/test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.config.spec import ModelSpec, TrainSpec
from kiln.data.text import ByteTokenizer, TextPreprocessor
from kiln.inference.lm import GenerationRequest, LMPredictor
from kiln.models import build_model
from kiln.models.generation import Sampling, generate_tokens
from kiln.registry import Registry
from kiln.train.engine import build_engine, full_state_dict
from kiln.train.lm import token_loss

pytestmark = pytest.mark.gpu

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


def _batches(pre: TextPreprocessor, rows: int) -> dict[str, torch.Tensor]:
    packed = pre.transform_batch({"text": [TEXT]})
    return {k: torch.from_numpy(v[:rows]).cuda() for k, v in packed.items()}


def _train(options: dict[str, Any], deepspeed: dict[str, Any], steps: int) -> tuple[Any, list]:
    pre = TextPreprocessor(ByteTokenizer(), block_size=64, text_column="text")
    spec = TrainSpec.model_validate(
        {
            "batch_size": 8,
            "num_workers": 1,
            "lr": 3e-3,
            "use_gpu": True,
            "deepspeed": {"zero_stage": 3, "precision": "bf16", **deepspeed},
        }
    )
    torch.manual_seed(0)
    model = build_model(
        ModelSpec.model_validate(options),
        pre.input_schema(),
        activation_checkpointing=spec.deepspeed.activation_checkpointing,
    )
    engine = build_engine(model, spec, total_steps=steps)
    batch, losses = _batches(pre, 8), []
    for _ in range(steps):
        loss, _count = token_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine, losses


@pytest.mark.parametrize("fused", [False, True])
def test_causal_lm_bf16_zero3_trains_and_generates_the_same_on_gpu_and_cpu(
    fused: bool, nccl: None, tmp_path: Path
) -> None:
    options = {"kind": "causal_lm", "n_layers": 2, "n_heads": 2, "d_model": 64}
    engine, losses = _train(options, {"fused_optimizer": fused}, steps=150)
    assert losses[-1] < 0.5 * losses[0], losses
    assert next(engine.module.parameters()).dtype == torch.bfloat16

    weights = full_state_dict(engine)
    assert all(t.dtype == torch.float32 for t in weights.values())
    pre = TextPreprocessor(ByteTokenizer(), block_size=64, text_column="text")
    documents = {
        "model.json": {
            "kind": "causal_lm",
            "options": {k: v for k, v in options.items() if k != "kind"},
            "task": "language_modeling",
            "input_schema": pre.input_schema(),
            "weights": "model.safetensors",
            "format": 1,
        },
        "preprocessing.json": pre.to_dict(),
        "metrics.json": {"metric": "none", "best": {}, "history": []},
    }
    ref = Registry(str(tmp_path)).register("gpu-lm", weights, documents).ref
    request = GenerationRequest(prompt="def add(a, b):\n", max_tokens=24, temperature=0.0)
    on_gpu = LMPredictor(str(tmp_path), ref, device="cuda").complete(request)
    on_cpu = LMPredictor(str(tmp_path), ref, device="cpu").complete(request)
    assert on_gpu.text == on_cpu.text, (on_gpu, on_cpu)
    assert on_gpu.completion_tokens == on_cpu.completion_tokens > 0


def test_kv_cache_matches_recompute_on_gpu() -> None:
    pre = TextPreprocessor(ByteTokenizer(), block_size=128, text_column="text")
    torch.manual_seed(0)
    model = build_model(
        ModelSpec.model_validate({"kind": "causal_lm", "n_layers": 2, "d_model": 64}),
        pre.input_schema(),
    ).cuda()
    prompt = [pre.tokenizer.eos_id, *pre.tokenizer.encode("import os\n")]
    cached = list(
        generate_tokens(model, prompt, max_new_tokens=40, sampling=Sampling(), eos_id=None)
    )
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(40):
            logits = model(torch.tensor([ids], device="cuda"))
            ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[len(prompt) :]


def test_hf_causal_lm_with_activation_checkpointing_under_zero3_bf16(nccl: None) -> None:
    options = {
        "kind": "hf_causal_lm",
        "config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 64,
            "n_positions": 64,
        },
    }
    _engine, losses = _train(options, {"activation_checkpointing": True}, steps=40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
