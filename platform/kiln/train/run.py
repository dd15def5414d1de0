"""`kiln train`: check the data, fit preprocessing, run the DeepSpeed TorchTrainer, register the
best checkpoint.

The driver never holds the dataset: files are checked from their metadata, preprocessing is
fitted from per-batch statistics, and Ray Data streams the rows into the workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from kiln import storage
from kiln.cluster import ResourcePlan, connect, local_resources, plan_training
from kiln.config import JobSpec, dump_spec, spec_hash, validate_spec
from kiln.data.fitted import FittedPreprocessor, preprocessor_from_dict
from kiln.data.pipeline import dedupe as dedupe_dataset
from kiln.data.pipeline import fit_on_dataset, preprocess_dataset, split_by_hash
from kiln.data.preprocess import Preprocessor
from kiln.data.source import DataInfo, check_data, read_dataset, resolve_files
from kiln.data.text import TextPreprocessor, unigram_perplexity
from kiln.data.text_pipeline import fit_text_preprocessor, pack_dataset, token_statistics
from kiln.errors import KilnError, TrainingError
from kiln.registry import ModelVersion, Registry
from kiln.tracking import jobs as tracked
from kiln.train.export import register_checkpoint
from kiln.train.loop import STATE_FILE

logger = logging.getLogger(__name__)

RUN_FILE = "kiln_run.json"
SPEC_FILE = "spec.yaml"


@dataclass
class Prepared:
    """What the driver learns before training: checked files, fitted preprocessing, counts."""

    train_info: DataInfo
    validation_info: DataInfo | None
    preprocessor: FittedPreprocessor
    stats: dict[str, Any]
    train_rows: int
    datasets: dict[str, Any] = field(default_factory=dict)
    raw_train: Any = None
    """The lazy training split as read (raw feature values), for its profile."""
    profile: dict[str, Any] | None = None
    """The training split's per-feature statistics (profile.json; None for language models)."""


@dataclass
class TrainOutcome:
    run_dir: str
    metrics: dict[str, Any]
    model: ModelVersion
    best_epoch: int
    history: list[dict[str, Any]]


def run(spec: JobSpec, *, resume: str | None = None, address: str | None = None) -> TrainOutcome:
    """Train `spec` end to end and register the best checkpoint.

    Args:
        spec: the validated job spec (ignored in favour of the run's own spec when resuming).
        resume: a run directory written by an earlier `kiln train`; training continues from
            its latest checkpoint with the spec and preprocessing saved there.
        address: a Ray cluster address; default RAY_ADDRESS or a local Ray.
    """
    if resume:
        spec, run_dir, saved = _load_run(resume)
    else:
        run_dir = storage.join(_storage_root(spec), f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        saved = None
    check = check_data(spec.data)
    local = local_resources(address)
    if local is not None:  # refuse a plan this machine cannot hold before starting Ray
        plan_training(spec.train, cluster_cpus=local[0], cluster_gpus=local[1])
    tracker = tracked.train_tracker(spec, run_dir, run_file=RUN_FILE)
    with tracker:  # FAILED/KILLED in the store when anything below raises
        connect(address)
        _check_storage(spec)
        plan = _plan(spec)
        logger.info("resources: %s", plan.describe())
        prepared = prepare(spec, plan, check, run_dir=run_dir, preprocessor=saved)
        if saved is None:
            _save_run(spec, run_dir, prepared)
            tracked.remember(tracker, run_dir, RUN_FILE)
        prepared.profile = training_profile(prepared, plan)
        callbacks = tracked.train_callbacks(tracker, run_dir)
        newest = _newest_checkpoint(run_dir) if resume else None
        result = fit(spec, prepared, plan, run_dir, callbacks=callbacks, resume_from=newest)
        outcome = _register(spec, prepared, result, run_dir)
        tracked.finish_training(
            tracker,
            spec,
            model=outcome.model,
            metrics=outcome.metrics,
            history=outcome.history,
            run_dir=run_dir,
        )
    return outcome


def prepare(
    spec: JobSpec,
    plan: ResourcePlan,
    check: tuple[DataInfo, DataInfo | None],
    *,
    run_dir: str,
    preprocessor: FittedPreprocessor | None = None,
) -> Prepared:
    """Build the lazy Ray datasets, and fit preprocessing on the training split unless given.

    De-duplication is a shuffle, so its result is written once under `run_dir` (and reused
    by --resume) instead of being recomputed every epoch.
    """
    if spec.data.task == "language_modeling":
        text_pre = preprocessor if isinstance(preprocessor, TextPreprocessor) else None
        return _prepare_text(spec, plan, check, preprocessor=text_pre)
    assert preprocessor is None or isinstance(preprocessor, Preprocessor)
    train_info, val_info = check
    data = spec.data
    assert data.label is not None  # required for tabular tasks
    columns = [*train_info.features, data.label]
    remote = {"num_cpus": plan.data_task_cpus}
    train_ds = read_dataset(train_info.files, columns=columns, ray_remote_args=remote)
    if val_info is not None:
        val_ds = read_dataset(val_info.files, columns=columns, ray_remote_args=remote)
    else:
        assert data.validation_split is not None
        train_ds, val_ds = split_by_hash(
            train_ds,
            data.validation_split,
            columns=columns,
            seed=spec.train.seed,
            num_cpus=plan.data_task_cpus,
        )
    if data.preprocess.dedupe:
        train_ds = _deduped_copy(train_ds, columns, storage.join(run_dir, "data", "train"), remote)
    fitted, stats = fit_on_dataset(
        train_ds,
        data.preprocess,
        features=list(train_info.features),
        numeric=list(train_info.numeric),
        categorical=list(train_info.categorical),
        label=data.label,
        task=data.task,
        seed=spec.train.seed,
        num_cpus=plan.data_task_cpus,
    )
    pre = preprocessor or fitted
    rows = int(stats["rows_used"])
    if rows < spec.train.num_workers:
        raise KilnError(
            f"data.train: {rows} usable training rows, fewer than train.num_workers "
            f"({spec.train.num_workers})"
        )
    datasets = {
        "train": preprocess_dataset(train_ds, pre, num_cpus=plan.data_task_cpus),
        "validation": preprocess_dataset(val_ds, pre, num_cpus=plan.data_task_cpus),
    }
    if _should_cache(spec, pre, rows, val_info):
        # Blocks go to the object store (spilled to disk past its size), not to the driver.
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return Prepared(train_info, val_info, pre, stats, rows, datasets, raw_train=train_ds)


def training_profile(prepared: Prepared, plan: ResourcePlan | None = None) -> dict[str, Any] | None:
    """Per-feature statistics of the raw training split, for drift monitoring (two streaming
    passes of small partials; the driver never holds rows). None for language models."""
    from kiln.monitor import profile_dataset

    if prepared.raw_train is None:
        return None
    info = prepared.train_info
    profile = profile_dataset(
        prepared.raw_train,
        numeric=list(info.numeric),
        categorical=list(info.categorical),
        num_cpus=plan.data_task_cpus if plan else 0.25,
    )
    return profile.to_dict()


def _prepare_text(
    spec: JobSpec,
    plan: ResourcePlan,
    check: tuple[DataInfo, DataInfo | None],
    *,
    preprocessor: TextPreprocessor | None = None,
) -> Prepared:
    """Language modeling: fit the tokenizer (unless given), pack documents into blocks, count
    tokens, and compute the byte/token unigram baseline on the validation split."""
    train_info, val_info = check
    data, cpus = spec.data, plan.data_task_cpus
    remote = {"num_cpus": cpus}
    train_ds = read_dataset(train_info.files, columns=[data.text], ray_remote_args=remote)
    if val_info is not None:
        val_ds = read_dataset(val_info.files, columns=[data.text], ray_remote_args=remote)
    else:
        assert data.validation_split is not None
        train_ds, val_ds = split_by_hash(
            train_ds,
            data.validation_split,
            columns=[data.text],
            seed=spec.train.seed,
            num_cpus=cpus,
        )
    pre = preprocessor or fit_text_preprocessor(train_ds, data)
    datasets = {
        "train": pack_dataset(train_ds, pre, num_cpus=cpus),
        "validation": pack_dataset(val_ds, pre, num_cpus=cpus),
    }
    vocab = pre.tokenizer.vocab_size
    counted = {name: token_statistics(ds, vocab, num_cpus=cpus) for name, ds in datasets.items()}
    train, val = counted["train"], counted["validation"]
    if train.sequences < spec.train.num_workers:
        raise KilnError(
            f"data.train: {train.sequences} packed sequences of data.block_size "
            f"{data.block_size} tokens, fewer than train.num_workers ({spec.train.num_workers})"
        )
    if val.tokens == 0:
        raise KilnError("data.validation: no validation tokens (the split has no text)")
    baseline = unigram_perplexity(train.counts, val.counts)
    stats = {
        "rows_used": train.sequences,
        "train_tokens": train.tokens,
        "validation_sequences": val.sequences,
        "validation_tokens": val.tokens,
        "val_unigram_perplexity": baseline,
    }
    logger.info(
        "language modeling: %d training tokens in %d sequences of %d, %d validation tokens; "
        "unigram baseline perplexity on validation %.3f",
        train.tokens,
        train.sequences,
        data.block_size,
        val.tokens,
        baseline,
    )
    row_bytes = 8 * data.block_size  # input_ids + labels, int32
    if _cache_decision(spec, (train.sequences + val.sequences) * row_bytes):
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return Prepared(train_info, val_info, pre, stats, train.sequences, datasets)


def _should_cache(
    spec: JobSpec, pre: Preprocessor, train_rows: int, val_info: DataInfo | None
) -> bool:
    """`data.cache`, with `auto` resolved against the cluster's object store memory."""
    if spec.data.cache != "auto":
        return bool(spec.data.cache)
    split = spec.data.validation_split
    if val_info is not None:
        val_rows = val_info.num_rows if val_info.num_rows is not None else train_rows
    else:
        val_rows = math.ceil(train_rows * (split or 0.0) / (1.0 - (split or 0.0)))
    schema = pre.input_schema()
    row_bytes = 4 * schema["num_inputs"] + 8 * len(schema["categorical_cardinalities"]) + 8
    return _cache_decision(spec, (train_rows + val_rows) * row_bytes)


def _cache_decision(spec: JobSpec, needed: int) -> bool:
    """Cache when `needed` bytes fit in a quarter of the object store (or as data.cache says)."""
    import ray

    if spec.data.cache != "auto":
        return bool(spec.data.cache)
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    cache = needed <= store / 4
    logger.info(
        "data.cache auto: preprocessed data ~%.0f MB, object store %.0f MB: %s",
        needed / 2**20,
        store / 2**20,
        "cached in the object store" if cache else "streamed from the files every epoch",
    )
    return cache


def _deduped_copy(ds: Any, columns: list[str], location: str, remote: dict[str, float]) -> Any:
    fs, path = storage.open_location(location, field="train.storage")
    if not storage.exists(fs, path):
        staging = path + ".staging"
        if storage.exists(fs, staging):  # left by an interrupted earlier attempt
            fs.delete_dir(staging)
        dedupe_dataset(ds, columns=columns, num_cpus=remote["num_cpus"]).write_parquet(
            staging, filesystem=fs
        )
        fs.move(staging, path)
    files = resolve_files(location, "parquet", field="data.preprocess.dedupe")
    return read_dataset(files, columns=columns, ray_remote_args=remote)


def fit(
    spec: JobSpec,
    prepared: Prepared,
    plan: ResourcePlan,
    run_dir: str,
    *,
    callbacks: list[Any] | None = None,
    resume_from: str | None = None,
    warm_start: dict[str, Any] | None = None,
) -> Any:
    """Run the TorchTrainer; returns Ray Train's Result.

    Args:
        callbacks: extra Ray Train callbacks (a Tune trial forwards each report with one).
        resume_from: a kiln checkpoint directory to start from when Ray Train has no
            checkpoint of the run on record (a PBT trial cloning another trial's state;
            `--resume` of a run interrupted before Ray Train recorded its checkpoints).
        warm_start: `kiln.train.warmstart.warm_start_config(...)`: every worker loads these
            registered weights and freezes these prefixes before building its engine.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kiln.train.ingest import ValidationExactDataConfig
    from kiln.train.loop import train_loop_per_worker

    train = spec.train
    per_worker = prepared.train_rows // train.num_workers
    micro_batches = math.ceil(
        per_worker / (train.batch_size // train.num_workers // train.deepspeed.grad_accum)
    )
    total_steps = train.epochs * max(1, math.ceil(micro_batches / train.deepspeed.grad_accum))
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    loop_config = {
        "spec": spec.model_dump(mode="json"),
        "input_schema": prepared.preprocessor.input_schema(),
        "label_scale": _label_scale(prepared.preprocessor),
        "total_steps": total_steps,
    }
    if isinstance(prepared.preprocessor, TextPreprocessor):
        loop_config["preprocessing"] = prepared.preprocessor.to_dict()
        loop_config["unigram_perplexity"] = prepared.stats["val_unigram_perplexity"]
    if resume_from is not None:
        loop_config["resume_from"] = resume_from
    if warm_start is not None:
        loop_config["warm_start"] = warm_start
    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]  # returns the history to rank 0
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=plan.worker_resources,
            placement_strategy=train.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=prepared.datasets,
        dataset_config=ValidationExactDataConfig(),
        run_config=RunConfig(
            name=run_dir.rstrip("/").rsplit("/", 1)[1],
            storage_path=run_dir.rstrip("/").rsplit("/", 1)[0],
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute=spec.metric,
                checkpoint_score_order=spec.mode,
            ),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=list(callbacks or []),
        ),
    )
    logger.info(
        "training %s: %d rows, %d workers, run dir %s",
        spec.name,
        prepared.train_rows,
        train.num_workers,
        run_dir,
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}") from result.error
    return result


def best_checkpoint(spec: JobSpec, result: Any) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint with the best `spec.metric`, and its reported metrics."""
    scored = [
        (ckpt, metrics)
        for ckpt, metrics in (result.best_checkpoints or [])
        if spec.metric in metrics
    ]
    if not scored:
        raise TrainingError(f"training reported no checkpoint with metric {spec.metric!r}")
    pick = max if spec.mode == "max" else min
    return pick(scored, key=lambda pair: pair[1][spec.metric])


def _register(
    spec: JobSpec,
    prepared: Prepared,
    result: Any,
    run_dir: str,
    *,
    extra_lineage: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Register the best checkpoint; `extra_lineage` (e.g. kiln retrain's decision) is merged
    into lineage.json."""
    checkpoint, metrics = best_checkpoint(spec, result)
    lineage = {
        "run_dir": run_dir,
        "checkpoint": checkpoint.path,
        "spec_hash": spec_hash(spec),
        "data": {
            "train": prepared.train_info.files.fingerprint(),
            "validation": prepared.validation_info.files.fingerprint()
            if prepared.validation_info
            else None,
            "train_rows": prepared.train_rows,
        },
        **(extra_lineage or {}),
    }
    history = list(result.return_value or [])
    version = register_checkpoint(
        Registry(spec.registry),
        spec,
        checkpoint,
        prepared.preprocessor,
        metrics=metrics,
        history=history,
        lineage=lineage,
        profile=prepared.profile or training_profile(prepared),
    )
    return TrainOutcome(run_dir, dict(metrics), version, int(metrics.get("epoch", 0)), history)


def _newest_checkpoint(run_dir: str) -> str | None:
    """The newest kiln checkpoint on disk in `run_dir`, for --resume when Ray Train has no record
    of it: a run interrupted while Ray Train's controller was still handling its first reports
    leaves checkpoints but no checkpoint_manager_snapshot.json. Ray Train's own record, when it
    has one, still wins (the loop only falls back to this)."""
    states = checkpoint_states(run_dir)
    return states[-1][0] if states else None


def checkpoint_states(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, kiln_state.json) of every checkpoint Ray Train kept in a run, oldest epoch first."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = storage.open_location(run_dir, field="train.storage")
    if not storage.exists(fs, path):
        return []
    found = []
    for info in fs.get_file_info(FileSelector(path)):
        state_file = storage.join(info.path, STATE_FILE)
        if info.type == FileType.Directory and storage.exists(fs, state_file):
            state = json.loads(storage.read_bytes(fs, state_file))
            where = (
                run_dir.split("://", 1)[0] + "://" + info.path if "://" in run_dir else info.path
            )
            found.append((where, state))
    return sorted(found, key=lambda item: int(item[1]["epoch"]))


def _plan(spec: JobSpec) -> ResourcePlan:
    import ray

    resources = ray.cluster_resources()
    return plan_training(
        spec.train,
        cluster_cpus=float(resources.get("CPU", 0.0)),
        cluster_gpus=float(resources.get("GPU", 0.0)),
    )


def _check_storage(spec: JobSpec) -> None:
    """On a cluster spanning several hosts, storage and registry must be shared locations."""
    import ray

    from kiln.cluster.placement import check_shared_storage

    check_shared_storage(spec, ray.nodes())


def _label_scale(pre: FittedPreprocessor) -> dict[str, float]:
    if not isinstance(pre, Preprocessor) or pre.task != "regression":
        return {}
    return {"label_mean": pre.label.mean, "label_std": pre.label.std}


def _storage_root(spec: JobSpec) -> str:
    """train.storage as Ray Train takes it: an absolute local path or the URI as given."""
    location = spec.train.storage
    return location if storage.is_uri(location) else os.path.abspath(location)


def _save_run(spec: JobSpec, run_dir: str, prepared: Prepared) -> None:
    """Write the spec and fitted preprocessing beside the checkpoints, for --resume."""
    fs, path = storage.open_location(run_dir, field="train.storage")
    fs.create_dir(path, recursive=True)
    storage.write_bytes(fs, storage.join(path, SPEC_FILE), dump_spec(spec).encode())
    run_file = {"preprocessing": prepared.preprocessor.to_dict(), "stats": prepared.stats}
    storage.write_bytes(fs, storage.join(path, RUN_FILE), json.dumps(run_file).encode())


def _load_run(run_dir: str) -> tuple[JobSpec, str, FittedPreprocessor]:
    location = run_dir if storage.is_uri(run_dir) else os.path.abspath(run_dir)
    fs, path = storage.open_location(location, field="--resume")
    spec_path, run_path = storage.join(path, SPEC_FILE), storage.join(path, RUN_FILE)
    if not (storage.exists(fs, spec_path) and storage.exists(fs, run_path)):
        raise KilnError(f"--resume {run_dir}: not a kiln run directory (no {SPEC_FILE}/{RUN_FILE})")
    raw = yaml.safe_load(storage.read_bytes(fs, spec_path))
    spec = validate_spec(raw, source=f"{run_dir}/{SPEC_FILE}")
    saved = json.loads(storage.read_bytes(fs, run_path))
    return spec, location.rstrip("/"), preprocessor_from_dict(saved["preprocessing"])
