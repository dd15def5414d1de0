"""Everything DeepSpeed: the engine config generated from the spec, the optimizer and schedule,
and a consolidated fp32 state dict from any ZeRO stage."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kiln.config.spec import TrainSpec

logger = logging.getLogger(__name__)


def deepspeed_config(train: TrainSpec) -> dict[str, Any]:
    """The DeepSpeed config dict for `train`, with `train.deepspeed.config` merged over it."""
    ds = train.deepspeed
    micro_batch = train.batch_size // (train.num_workers * ds.grad_accum)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # kiln prints its own progress lines; DeepSpeed's per-step prints would interleave.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.fused_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.lr, "weight_decay": train.weight_decay},
        }
    else:
        # A torch optimizer object: no fused-kernel JIT build, valid under every ZeRO stage.
        config["zero_allow_untested_optimizer"] = True
        config["zero_force_ds_cpu_optimizer"] = False
    return _deep_merge(config, ds.config)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_engine(model: nn.Module, train: TrainSpec, total_steps: int) -> Any:
    """deepspeed.initialize with the generated config, AdamW and warm-up + cosine schedule."""
    import deepspeed

    config = deepspeed_config(train)
    if "optimizer" in config:
        _pin_cuda_arch()
    schedule = warmup_cosine(train.warmup_steps, total_steps)
    # Frozen parameters (kiln retrain's `freeze`) stay out of the optimizer altogether.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=None if optimizer else trainable,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=config,
    )
    return engine


def _pin_cuda_arch() -> None:
    """Give DeepSpeed's fused-kernel JIT build an architecture list it can parse.

    DeepSpeed 0.19 reads TORCH_CUDA_ARCH_LIST as plain `major.minor[+PTX]` numbers: an
    architecture-specific entry such as `9.0a` (which CUDA 12/13 images set for Hopper) fails
    the build with `invalid literal for int()` (seen on an H200). Such entries are built as
    `9.0`; without the variable, the build targets this machine's GPU.
    """
    current = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if current:
        entries = [e for e in current.replace(" ", ";").split(";") if e]
        plain = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", e) for e in entries]
        if plain != entries:
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(dict.fromkeys(plain))
            logger.warning(
                "TORCH_CUDA_ARCH_LIST=%s has entries DeepSpeed cannot build; using %s",
                current,
                os.environ["TORCH_CUDA_ARCH_LIST"],
            )
        return
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the engine's module on every rank, from any ZeRO stage.

    A collective under ZeRO-3 (parameters are gathered one at a time, so peak memory grows by
    one parameter, not the model): every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None and hasattr(param, "ds_id"):  # ZeRO-3, frozen: no fp32 copy to gather
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().float().cpu().clone()
        if full is None:
            full = param.detach()
        state[name] = full.detach().float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    return state


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
