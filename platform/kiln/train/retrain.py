"""`kiln retrain`: fine-tune a registered model on new data and promote it only if it holds up.

The new version starts from the registered weights (every worker loads them through the
registry, hash-verified, and freezes `retrain.freeze`), maps inputs with the registered model's
fitted preprocessing (so it reads rows exactly as the old version does), trains as `kiln train`
does, and is then scored beside the old version on the same held-out files by the same code.
The decision, both scores, the margin and the holdout's fingerprint go into the new version's
`lineage.json` under `retrain`, which is registered whatever the decision; only the alias move
depends on it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as pads
import torch
from safetensors.torch import load_file
from torch import nn

from kiln import storage
from kiln.cluster import connect, local_resources, plan_training
from kiln.config import JobSpec, validate_spec
from kiln.config.spec import ModelSpec, RetrainSpec
from kiln.data.fitted import preprocessor_from_dict
from kiln.data.preprocess import Preprocessor
from kiln.data.source import DataInfo, FileSet, check_data, check_files, resolve_files
from kiln.errors import DataError, SpecError, TrainingError
from kiln.models import build_model
from kiln.registry import ModelVersion, Registry
from kiln.registry.model import load_model
from kiln.tracking import jobs as tracked
from kiln.train.loop import WEIGHTS_FILE
from kiln.train.metrics import ClassificationMeter, RegressionMeter
from kiln.train.run import (
    RUN_FILE,
    TrainOutcome,
    _check_storage,
    _plan,
    _register,
    _storage_root,
    best_checkpoint,
    fit,
    prepare,
)
from kiln.train.warmstart import frozen_names, warm_start_config

logger = logging.getLogger(__name__)

_HOLDOUT_BATCH_ROWS = 65_536
_PYARROW_FORMATS = {"parquet": "parquet", "csv": "csv", "jsonl": "json"}


@dataclass(frozen=True)
class RetrainOutcome:
    """What `retrain` did: the training run, the version it started from, and the gate."""

    train: TrainOutcome
    source: ModelVersion
    decision: dict[str, Any]
    """The `retrain` record written to the new version's lineage.json."""

    @property
    def promoted(self) -> bool:
        """Whether the alias moved to the new version."""
        return bool(self.decision["promoted"])


def with_retrain_options(
    spec: JobSpec,
    *,
    data: str | None = None,
    holdout: str | None = None,
    margin: float | None = None,
    freeze: Sequence[str] | None = None,
    alias: str | None = None,
) -> JobSpec:
    """The spec with command-line options applied: `data` replaces `data.train`, the others
    override the `retrain` section. Validated again, so errors name the dotted field."""
    raw = spec.model_dump(mode="json")
    section = dict(raw.get("retrain") or {})
    if data is not None:
        raw["data"]["train"] = data
    for key, value in (
        ("holdout", holdout),
        ("margin", margin),
        ("freeze", list(freeze) if freeze else None),
        ("promote_to", alias),
    ):
        if value is not None:
            section[key] = value
    raw["retrain"] = section
    return validate_spec(raw, source="kiln retrain")


def passes_gate(old: float, new: float, *, mode: Literal["max", "min"], margin: float) -> bool:
    """The promotion rule: the new score may be worse than the old by at most `margin`.

    `mode` max: new >= old - margin; min: new <= old + margin. A NaN score never passes.
    """
    if math.isnan(old) or math.isnan(new):
        return False
    return new >= old - margin if mode == "max" else new <= old + margin


def gate_rule(mode: Literal["max", "min"]) -> str:
    """The rule as text, for messages and lineage."""
    return "new >= old - margin" if mode == "max" else "new <= old + margin"


def retrain(spec: JobSpec, source: str, *, address: str | None = None) -> RetrainOutcome:
    """Fine-tune `source` (a registry ref) on `spec.data.train`, gate, register, promote.

    Args:
        spec: the job spec with a `retrain` section (`with_retrain_options` fills one in).
        source: NAME, NAME:VERSION or NAME@ALIAS of the model to start from.
        address: a Ray cluster address; default RAY_ADDRESS or a local Ray.

    Raises:
        SpecError: the spec does not describe the registered model's architecture, a freeze
            prefix matches no parameter, or there is no holdout to compare on.
        DataError: the new data or the holdout lacks the registered model's columns.
    """
    settings = spec.retrain or RetrainSpec()
    registry = Registry(spec.registry)
    checked = _preflight(spec, settings, registry, source)
    src = checked.source
    local = local_resources(address)
    if local is not None:  # refuse a plan this machine cannot hold before starting Ray
        plan_training(spec.train, cluster_cpus=local[0], cluster_gpus=local[1])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = storage.join(_storage_root(spec), f"{spec.name}-retrain-{stamp}")
    tracker = tracked.train_tracker(spec, run_dir, run_file=RUN_FILE, kind="retrain")
    with tracker:  # FAILED/KILLED in the store when anything below raises
        tracker.set_tags({"kiln.retrain.from": src.ref})
        connect(address)
        _check_storage(spec)
        plan = _plan(spec)
        logger.info(
            "retraining %s from %s (%d parameter tensors frozen), its preprocessing reused",
            spec.name,
            src.ref,
            len(checked.frozen),
        )
        prepared = prepare(spec, plan, checked.data, run_dir=run_dir, preprocessor=checked.pre)
        warm = warm_start_config(_absolute(registry.root), src.ref, settings.freeze)
        callbacks = tracked.train_callbacks(tracker, run_dir)
        result = fit(spec, prepared, plan, run_dir, warm_start=warm, callbacks=callbacks)
        checkpoint, _ = best_checkpoint(spec, result)
        old_module = load_model(registry, src.ref).module
        new_module = _checkpoint_module(checkpoint, checked.model_doc)
        holdout = checked.holdout.files
        (old_scores, new_scores), rows = score_holdout(
            [old_module, new_module], checked.pre, holdout
        )
        decision = _decide(spec, settings, src, registry, old_scores, new_scores)
        decision |= {"freeze": list(settings.freeze), "frozen_parameters": checked.frozen}
        decision["holdout"] = {"location": holdout.location, "rows": rows}
        decision["holdout"] |= {"sha256": holdout.fingerprint()["sha256"]}
        outcome = _register(spec, prepared, result, run_dir, extra_lineage={"retrain": decision})
        if decision["promoted"]:
            registry.promote(outcome.model.ref, settings.promote_to)
        tracker.log_metrics(
            {f"holdout_old_{k}": v for k, v in old_scores.items()}
            | {f"holdout_new_{k}": v for k, v in new_scores.items()}
        )
        tracker.set_tags({"kiln.retrain.decision": decision["decision"]})
        tracked.finish_training(
            tracker,
            spec,
            model=outcome.model,
            metrics=outcome.metrics,
            history=outcome.history,
            run_dir=run_dir,
        )
    return RetrainOutcome(outcome, src, decision)


@dataclass(frozen=True)
class _Checked:
    """What the driver checked before starting Ray."""

    source: ModelVersion
    model_doc: dict[str, Any]
    pre: Preprocessor
    frozen: list[str]
    data: tuple[DataInfo, DataInfo | None]
    holdout: DataInfo


def _preflight(spec: JobSpec, settings: RetrainSpec, registry: Registry, source: str) -> _Checked:
    """Every check that needs neither Ray nor training, so mistakes fail in seconds."""
    src = registry.resolve(source)
    model_doc = registry.read_document(src, "model.json")
    pre = preprocessor_from_dict(registry.read_document(src, "preprocessing.json"))
    check_compatible(spec, src, model_doc, pre)
    assert isinstance(pre, Preprocessor)  # check_compatible refuses language models
    frozen = frozen_names(_parameter_names(model_doc), settings.freeze)
    location = _holdout_location(spec, settings)
    data = check_data(spec.data)
    _check_features(data[0], pre, src.ref)
    return _Checked(src, model_doc, pre, frozen, data, _check_holdout(spec, location, pre))


def check_compatible(spec: JobSpec, src: ModelVersion, model_doc: dict[str, Any], pre: Any) -> None:
    """Refuse a spec whose model is not the registered one: name, task, kind, options, label.

    Raises:
        SpecError: naming each difference.
    """
    if spec.data.task == "language_modeling" or not isinstance(pre, Preprocessor):
        raise SpecError(
            f"kiln retrain: {src.ref} is a language model; retrain supports classification "
            "and regression models"
        )
    if spec.name != src.name:
        raise SpecError(
            f"name: {spec.name!r} differs from --from {src.ref}; retrain registers a new version "
            f"of the same model (name: {src.name})"
        )
    differences = []
    if model_doc.get("task") != spec.data.task:
        differences.append(f"data.task: {spec.data.task} in the spec, {model_doc.get('task')}")
    if model_doc.get("kind") != spec.model.kind:
        differences.append(f"model.kind: {spec.model.kind} in the spec, {model_doc.get('kind')}")
    registered = model_doc.get("options", {})
    ours = spec.model.options
    for key in sorted(set(registered) | set(ours)):
        if registered.get(key) != ours.get(key):
            differences.append(
                f"model.{key}: {_shown(ours, key)} in the spec, {_shown(registered, key)}"
            )
    if spec.data.label != pre.label.name:
        differences.append(f"data.label: {spec.data.label} in the spec, {pre.label.name}")
    if differences:
        raise SpecError(
            f"the spec does not describe {src.ref}'s model ({'; '.join(differences)} in "
            f"{src.ref}); retrain keeps the architecture, so make the spec match"
        )


def score_holdout(
    modules: Sequence[nn.Module], pre: Preprocessor, files: FileSet
) -> tuple[list[dict[str, float]], int]:
    """Score every module on the same held-out rows with the validation metrics of training.

    The files are streamed in batches (never read whole); each batch is preprocessed once with
    the registered preprocessing and fed to every module, and the metrics come from the meters
    the training loop's evaluation uses, so the scores are in the units of `spec.metric`.

    Returns:
        One `{"val_<metric>": value}` dict per module, and the number of rows scored.
    """
    classification = pre.task == "classification"
    meters: list[Any] = [
        ClassificationMeter(int(pre.input_schema()["num_classes"]))
        if classification
        else RegressionMeter(pre.label.mean, pre.label.std)
        for _ in modules
    ]
    loss_fn: Any = (
        nn.CrossEntropyLoss(reduction="sum") if classification else nn.MSELoss(reduction="sum")
    )
    rows = 0
    with torch.inference_mode():
        for table in _holdout_batches(files, [*pre.features, pre.label.name]):
            arrays = pre.transform(table, with_label=True)
            x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
            x_cat = torch.from_numpy(arrays["x_cat"]) if "x_cat" in arrays else None
            rows += len(y)
            for module, meter in zip(modules, meters, strict=True):
                output = (module(x) if x_cat is None else module(x, x_cat)).float()
                meter.update(output, y, loss_fn(output, y).item())
    if rows == 0:
        raise DataError(f"retrain.holdout: no usable rows in {files.location!r}")
    return [{f"val_{k}": v for k, v in m.compute().items()} for m in meters], rows


def _holdout_batches(files: FileSet, columns: list[str]) -> Iterator[pa.Table]:
    """The holdout as tables of at most `_HOLDOUT_BATCH_ROWS` rows, file by file."""
    fmt = _PYARROW_FORMATS[files.format]
    for path in files.paths:
        dataset = pads.dataset(path, filesystem=files.filesystem, format=fmt)
        for batch in dataset.to_batches(columns=columns, batch_size=_HOLDOUT_BATCH_ROWS):
            if batch.num_rows:
                yield pa.Table.from_batches([batch])


def _decide(
    spec: JobSpec,
    settings: RetrainSpec,
    src: ModelVersion,
    registry: Registry,
    old_scores: dict[str, float],
    new_scores: dict[str, float],
) -> dict[str, Any]:
    """The gate's verdict with everything needed to audit it later."""
    metric, mode, margin = spec.metric, spec.mode, settings.margin
    if metric not in old_scores or metric not in new_scores:
        raise TrainingError(f"holdout scoring reported no {metric!r} (got {sorted(new_scores)})")
    old, new = old_scores[metric], new_scores[metric]
    promoted = passes_gate(old, new, mode=mode, margin=margin)
    aliases = registry.aliases(src.name)
    return {
        "from": src.ref,
        "metric": metric,
        "mode": mode,
        "old_score": old,
        "new_score": new,
        "margin": margin,
        "rule": gate_rule(mode),
        "promoted": promoted,
        "decision": "promoted" if promoted else "refused",
        "alias": settings.promote_to,
        "alias_before": aliases.get(settings.promote_to),
        "old_metrics": old_scores,
        "new_metrics": new_scores,
    }


def describe_decision(decision: dict[str, Any], new_ref: str) -> str:
    """One line a person reads: both scores, the margin, the rule and what happened."""
    metric, old, new = decision["metric"], decision["old_score"], decision["new_score"]
    name = decision["from"].split(":", 1)[0]
    alias = f"{name}@{decision['alias']}"
    scores = (
        f"{metric} on the holdout: new {new_ref} {new:.4f}, old {decision['from']} {old:.4f}, "
        f"margin {decision['margin']:g} (rule: {decision['rule']})"
    )
    if decision["promoted"]:
        return f"promoted {alias} -> {new_ref}; {scores}"
    before = decision["alias_before"]
    stays = f"{alias} stays on {name}:{before}" if before else f"{alias} is not set"
    worse = abs(new - old)
    return (
        f"not promoted: {new_ref} is worse than {decision['from']} by {worse:.4f}, more than "
        f"the margin; {scores}; {stays}"
    )


def _check_features(train: DataInfo, pre: Preprocessor, ref: str) -> None:
    missing = [f for f in pre.features if f not in train.features]
    if missing:
        raise DataError(
            f"data.train: {train.files.location!r} lacks feature columns {missing} that {ref} "
            "was trained on"
        )


def _holdout_location(spec: JobSpec, settings: RetrainSpec) -> str:
    """retrain.holdout, else data.validation; a split of the new data is no yardstick."""
    location = settings.holdout or spec.data.validation
    if location is None:
        raise SpecError(
            "retrain.holdout: required when the spec holds out data.validation_split (a split of "
            "the new data is no yardstick for the old model); give --holdout PATH"
        )
    return location


def _check_holdout(spec: JobSpec, location: str, pre: Preprocessor) -> DataInfo:
    """Resolve and check the holdout files against the registered model's columns."""
    return check_files(
        resolve_files(location, spec.data.format, "retrain.holdout"),
        label=pre.label.name,
        features=list(pre.features),
        task=pre.task,
        categorical_columns=spec.data.preprocess.categorical_columns,
        field="retrain.holdout",
    )


def _parameter_names(model_doc: dict[str, Any]) -> list[str]:
    """The registered model's parameter names, from a module built without memory (meta)."""
    with torch.device("meta"):
        module = build_model(_model_spec(model_doc), model_doc["input_schema"])
    return [name for name, _ in module.named_parameters()]


def _checkpoint_module(checkpoint: Any, model_doc: dict[str, Any]) -> nn.Module:
    """The bare module with the best checkpoint's consolidated weights, in eval mode."""
    with checkpoint.as_directory() as directory:
        tensors = load_file(str(Path(directory, WEIGHTS_FILE)))
    module = build_model(_model_spec(model_doc), model_doc["input_schema"])
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def _model_spec(model_doc: dict[str, Any]) -> ModelSpec:
    return ModelSpec.model_validate({"kind": model_doc["kind"], **model_doc.get("options", {})})


def _absolute(root: str) -> str:
    """The registry root as every worker can open it, whatever its working directory."""
    return root if storage.is_uri(root) else os.path.abspath(os.path.expanduser(root))


def _shown(options: dict[str, Any], key: str) -> str:
    return repr(options[key]) if key in options else "(unset)"
