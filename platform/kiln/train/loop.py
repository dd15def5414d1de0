"""The per-worker training function Ray Train runs on every worker.

It reads top to bottom: set up the model and DeepSpeed engine, resume from Ray Train's
checkpoint if there is one, then for each epoch train on this worker's shard, evaluate the
validation shard (reduced across workers), checkpoint on the spec's cadence and report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from kiln import metrics as kiln_metrics
from kiln.config.spec import JobSpec
from kiln.models import build_model
from kiln.progress import eta_seconds, format_duration
from kiln.train.engine import build_engine, full_state_dict
from kiln.train.ingest import iter_micro_batches
from kiln.train.lm import sample_text, token_loss
from kiln.train.metrics import ClassificationMeter, LanguageModelMeter, RegressionMeter
from kiln.train.warmstart import apply_warm_start

logger = logging.getLogger("kiln.train")

CHECKPOINT_TAG = "kiln"
STATE_FILE = "kiln_state.json"
EVALUATION_FILE = "evaluation.json"
WEIGHTS_FILE = "model.safetensors"


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train entry point. `config` carries the validated spec as JSON plus fitted facts.

    Returns:
        The per-epoch metrics of the whole run, including epochs before a resume (Ray Train
        hands rank 0's return value to the driver).
    """
    import ray.train
    import ray.train.torch

    _configure_worker_logging()
    # DeepSpeed calls a torch collective that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    spec = JobSpec.model_validate(config["spec"])
    input_schema: dict[str, Any] = config["input_schema"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    nodes = _worker_nodes(world)
    if rank == 0:
        logger.info("%d workers on nodes %s", world, nodes)
    torch.manual_seed(spec.train.seed)

    model = build_model(
        spec.model,
        input_schema,
        activation_checkpointing=spec.train.deepspeed.activation_checkpointing,
    )
    if config.get("warm_start"):  # kiln retrain: registered weights, some frozen
        frozen = apply_warm_start(model, config["warm_start"])
        if rank == 0:
            logger.info(
                "warm start from %s; %d parameter tensors frozen",
                config["warm_start"]["ref"],
                len(frozen),
            )
    engine = build_engine(model, spec.train, total_steps=config["total_steps"])
    start_epoch, global_step, history = _resume(engine, spec, config.get("resume_from"))
    resumed_from = start_epoch - 1
    dtype = _input_dtype(spec)
    is_lm = spec.data.task == "language_modeling"
    is_classification = spec.data.task == "classification"
    loss_fn = torch.nn.CrossEntropyLoss() if is_classification else torch.nn.MSELoss()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    micro_batch = spec.train.batch_size // (world * spec.train.deepspeed.grad_accum)
    run_start, first_step = time.perf_counter(), global_step  # for the step line's ETA
    for epoch in range(start_epoch, spec.train.epochs + 1):
        if _steps_done(global_step, spec):  # resumed after the last step's checkpoint
            break
        engine.train()
        epoch_start, seen, loss_sum, tokens = time.perf_counter(), 0, 0.0, 0
        window_start, window_rows = time.perf_counter(), 0
        seed = spec.train.seed + epoch if spec.train.shuffle else None
        for batch in iter_micro_batches(train_shard, micro_batch, shuffle_seed=seed, device=device):
            if is_lm:
                loss, count = token_loss(engine, batch)
            else:
                loss = loss_fn(_forward(engine, batch, dtype).float(), batch["y"])
                count = len(batch["y"])
            engine.backward(loss)
            engine.step()
            rows = len(next(iter(batch.values())))
            seen, window_rows, tokens = seen + rows, window_rows + rows, tokens + count
            # Weighted by rows (tabular) or target tokens (language modeling).
            loss_sum += loss.item() * count
            if engine.is_gradient_accumulation_boundary():
                global_step += 1
                if _steps_done(global_step, spec):
                    break  # every rank takes the same steps, so all stop here together
            if (
                rank == 0
                and engine.is_gradient_accumulation_boundary()
                and (global_step % spec.train.log_every == 0)
            ):
                rate = window_rows * world / max(time.perf_counter() - window_start, 1e-9)
                steps_per_s = (global_step - first_step) / (time.perf_counter() - run_start)
                logger.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.3e %s %.0f eta %s",
                    epoch,
                    spec.train.epochs,
                    global_step,
                    config["total_steps"],
                    loss.item(),
                    engine.get_lr()[0],
                    "tokens/s" if is_lm else "samples/s",
                    rate * spec.data.block_size if is_lm else rate,
                    format_duration(eta_seconds(global_step, config["total_steps"], steps_per_s)),
                )
                window_start, window_rows = time.perf_counter(), 0
        train_time = time.perf_counter() - epoch_start
        train_loss = _global_mean(loss_sum, tokens, device)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "step": global_step,
            "train_loss": train_loss,
            "samples_per_s": _global_sum(seen, device) / max(train_time, 1e-9),
            "lr": float(engine.get_lr()[0]),
            "resumed_from_epoch": resumed_from,
            "worker_nodes": nodes,
        }
        if is_lm:
            metrics["tokens_per_s"] = _global_sum(tokens, device) / max(train_time, 1e-9)
            metrics["train_perplexity"] = math.exp(min(train_loss, 700.0))
        evaluation: dict[str, Any] = {"epoch": epoch}
        metrics |= evaluate(engine, val_shard, config, spec, device, dtype, details=evaluation)
        if is_lm:
            metrics |= _lm_extras(engine, config, spec, rank)
        if rank == 0:
            logger.info("epoch %d done: %s", epoch, _format_metrics(metrics))
        history.append(metrics)
        last = epoch == spec.train.epochs or _steps_done(global_step, spec)
        due = epoch % spec.train.checkpoint_every == 0 or last
        _report(
            engine,
            metrics,
            history,
            checkpoint=due,
            rank=rank,
            evaluation=evaluation,
            job=spec.name,
        )
        if last:
            break
    return history


def evaluate(
    engine: Any,
    shard: Any,
    config: dict[str, Any],
    spec: JobSpec,
    device: Any,
    dtype: Any,
    *,
    details: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Validation metrics over every worker's validation shard, reduced exactly.

    Shards may differ in length by a few rows, yet under ZeRO-3 every forward pass is a
    collective, so ranks step in lock-step and a rank that has run out runs a throwaway
    forward on its last batch until all are done. `details`, when given (on every rank), gets
    the evaluation document: confusion matrix and per-class scores, or a residual sample.
    """
    engine.eval()
    if spec.data.task == "language_modeling":
        meter: Any = LanguageModelMeter()

        def measure_tokens(batch: dict[str, torch.Tensor]) -> None:
            loss, count = token_loss(engine, batch, reduction="sum")
            meter.update(loss.item(), count)

        _lockstep(shard, 64, device, measure_tokens, lambda batch: token_loss(engine, batch))
    else:
        if spec.data.task == "classification":
            meter = ClassificationMeter(int(config["input_schema"]["num_classes"]))
            loss_fn: Any = torch.nn.CrossEntropyLoss(reduction="sum")
        else:
            meter = RegressionMeter(**config.get("label_scale", {}))
            loss_fn = torch.nn.MSELoss(reduction="sum")

        def measure_rows(batch: dict[str, torch.Tensor]) -> None:
            output = _forward(engine, batch, dtype).float()
            meter.update(output, batch["y"], loss_fn(output, batch["y"]).item())

        _lockstep(shard, 4096, device, measure_rows, lambda batch: _forward(engine, batch, dtype))
    state = meter.state.to(device)
    if dist.is_initialized():
        dist.all_reduce(state)
    meter.state = state.cpu()
    if details is not None:
        details |= meter.evaluation(device)
    return {f"val_{name}": value for name, value in meter.compute().items()}


def _lockstep(
    shard: Any,
    batch_size: int,
    device: Any,
    measure: Callable[[dict[str, torch.Tensor]], None],
    throwaway: Callable[[dict[str, torch.Tensor]], Any],
) -> None:
    """`measure` each of this rank's batches in lock-step with the other ranks; a rank that has
    run out calls `throwaway` on its last batch until every rank is done."""
    batches = iter(
        shard.iter_torch_batches(batch_size=batch_size, device=device, prefetch_batches=2)
    )
    last = None
    with torch.no_grad():
        while True:
            batch = next(batches, None)
            if not _any_rank(batch is not None, device):
                break
            if batch is None:
                if last is not None:
                    throwaway(last)
                continue
            measure(batch)
            last = batch


def _lm_extras(engine: Any, config: dict[str, Any], spec: JobSpec, rank: int) -> dict[str, Any]:
    """The unigram baseline beside the metrics, and a greedy sample of `train.sample_prompt`
    (under ZeRO-3 every forward is a collective, so every rank generates it)."""
    extras: dict[str, Any] = {"val_unigram_perplexity": config["unigram_perplexity"]}
    if spec.train.sample_tokens == 0:
        return extras
    if rank == 0 or spec.train.deepspeed.zero_stage == 3:
        prompt, tokens = spec.train.sample_prompt, spec.train.sample_tokens
        text = sample_text(engine.module, config["preprocessing"], prompt, tokens)
        if rank == 0:
            logger.info("sample: %r -> %r", spec.train.sample_prompt, text)
            extras["sample"] = text
    return extras


def _forward(engine: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    x = batch["x"].to(dtype)
    if "x_cat" in batch:
        return engine(x, batch["x_cat"])
    return engine(x)


def _report(
    engine: Any,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    *,
    checkpoint: bool,
    rank: int,
    evaluation: dict[str, Any] | None = None,
    job: str = "",
) -> None:
    """ray.train.report, with a checkpoint when due: every rank saves its DeepSpeed shard
    (for resuming) and rank 0 adds the consolidated fp32 weights and the loop state. Rank 0
    also sets the training gauges (kiln.metrics) for Prometheus."""
    import ray.train

    if rank == 0:
        _export_metrics(metrics, job, ray.train.get_context().get_experiment_name())
    if not checkpoint:
        ray.train.report(metrics)
        return
    weights = full_state_dict(engine)
    with tempfile.TemporaryDirectory(prefix="kiln-ckpt-") as tmp:
        engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag=CHECKPOINT_TAG)
        if rank == 0:
            save_file(weights, os.path.join(tmp, WEIGHTS_FILE))
            Path(tmp, STATE_FILE).write_text(json.dumps({**metrics, "history": history}))
            if evaluation and "task" in evaluation:  # this epoch's, with its checkpoint
                Path(tmp, EVALUATION_FILE).write_text(json.dumps(evaluation))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export_metrics(metrics: dict[str, Any], job: str, run: str) -> None:
    """Set the training gauges from one epoch's results; a metrics failure never stops
    training."""
    try:
        for name, value, tags in kiln_metrics.training_samples(metrics, job, run):
            kiln_metrics.shared(name).set(value, tags=tags)
    except Exception:
        logger.warning("could not export training metrics", exc_info=True)


def _resume(
    engine: Any, spec: JobSpec, resume_from: str | None = None
) -> tuple[int, int, list[dict[str, Any]]]:
    """Load Ray Train's latest checkpoint into the engine; without one, `resume_from` (another
    run's kiln checkpoint directory or URI: a PBT trial cloning a better trial).

    Returns:
        (next epoch, global step, per-epoch metrics so far).
    """
    import ray.train

    checkpoint, cloned = ray.train.get_checkpoint(), False
    if checkpoint is None and resume_from is not None:
        checkpoint, cloned = ray.train.Checkpoint(resume_from), True
    if checkpoint is None:
        return 1, 0, []
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(os.path.join(directory, "deepspeed"), tag=CHECKPOINT_TAG)
        state = json.loads(Path(directory, STATE_FILE).read_text())
    if cloned:
        _apply_optimizer_spec(engine, spec)
    source = f" {resume_from}" if cloned else ""
    logger.info(
        "resumed from checkpoint%s after epoch %d (step %d)", source, state["epoch"], state["step"]
    )
    return int(state["epoch"]) + 1, int(state["step"]), list(state.get("history", []))


def _apply_optimizer_spec(engine: Any, spec: JobSpec) -> None:
    """After loading another run's optimizer state, use this spec's learning rate and weight
    decay (PBT's mutations), keeping the schedule's position."""
    scheduler = engine.lr_scheduler
    for index, group in enumerate(engine.optimizer.param_groups):
        group["weight_decay"] = spec.train.weight_decay
        group["initial_lr"] = spec.train.lr
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs[index] = spec.train.lr
            factor = scheduler.lr_lambdas[index](scheduler.last_epoch)
            group["lr"] = spec.train.lr * factor
        else:
            group["lr"] = spec.train.lr


def _steps_done(global_step: int, spec: JobSpec) -> bool:
    return spec.train.max_steps is not None and global_step >= spec.train.max_steps


def _worker_nodes(world: int) -> str:
    """The Ray node id of every rank, in rank order, comma-separated."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return node
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return ",".join(str(n) for n in nodes)


def _input_dtype(spec: JobSpec) -> torch.dtype:
    precision = spec.train.deepspeed.precision
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _any_rank(flag: bool, device: Any) -> bool:
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _global_sum(value: float, device: Any) -> float:
    if not dist.is_initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def _global_mean(total: float, count: int, device: Any) -> float:
    return _global_sum(total, device) / max(_global_sum(count, device), 1.0)


def _format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in metrics.items()
        if key not in ("worker_nodes", "sample")  # logged on their own
    )


def _configure_worker_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[kiln] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
