"""`kiln train`, `kiln validate`, `kiln schema`."""

from __future__ import annotations

import argparse
import json
from typing import Any

OVERRIDES_HELP = "dotted key=value overrides, values parsed as YAML (train.num_workers=2)"


def add_commands(commands: Any) -> None:
    """Register the training commands on the top-level subparsers."""
    train = commands.add_parser(
        "train",
        help="train a job spec on Ray + DeepSpeed and register the best model",
        description="Check the data, fit preprocessing on the training split, train with a Ray "
        "Train TorchTrainer running DeepSpeed, and register the best checkpoint.",
    )
    train.add_argument("spec", nargs="?", help="YAML job spec (omit with --resume)")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its latest "
        "checkpoint, with the spec and preprocessing saved in RUN_DIR",
    )
    train.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    train.set_defaults(handler=_train)

    validate = commands.add_parser(
        "validate",
        help="check a job spec and its data without training",
        description="Validate the spec, resolve the model kind, and check every data file's "
        "schema (label, features, types, rows) without starting Ray.",
    )
    validate.add_argument("spec", help="YAML job spec")
    validate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    validate.set_defaults(handler=_validate)

    schema = commands.add_parser("schema", help="print the job spec's JSON schema")
    schema.set_defaults(handler=_schema)


def _train(args: argparse.Namespace) -> int:
    from kiln.config import load_spec
    from kiln.errors import KilnError
    from kiln.train.run import run

    if args.resume and args.spec:
        raise KilnError("give a spec or --resume RUN_DIR, not both")
    if not args.resume and not args.spec:
        raise KilnError("kiln train needs a job spec (or --resume RUN_DIR)")
    spec = load_spec(args.spec, args.overrides) if args.spec else None
    try:
        outcome = run(spec, resume=args.resume, address=args.address)  # type: ignore[arg-type]
    finally:
        _shutdown_ray()
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in outcome.metrics.items()}
    print(f"registered {outcome.model.ref} (best epoch {outcome.best_epoch})")
    print(f"run dir: {outcome.run_dir}")
    print("metrics: " + json.dumps(metrics))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kiln.config import load_spec
    from kiln.data.source import check_data
    from kiln.models import resolve_factory

    spec = load_spec(args.spec, args.overrides)
    resolve_factory(spec.model.kind)
    train_info, val_info = check_data(spec.data)
    print(f"spec ok: {spec.name} ({spec.data.task}, model {spec.model.kind})")
    for split, info in (("train", train_info), ("validation", val_info)):
        if info is None:
            continue
        rows = "?" if info.num_rows is None else str(info.num_rows)
        if spec.data.task == "language_modeling":
            print(
                f"{split}: {len(info.files.paths)} files, {rows} documents in column "
                f"{spec.data.text!r}, tokenizer {spec.data.tokenizer.kind}, "
                f"block_size {spec.data.block_size}"
            )
            continue
        print(
            f"{split}: {len(info.files.paths)} files, {rows} rows, {len(info.features)} features "
            f"({len(info.categorical)} categorical), label {spec.data.label!r}"
        )
    return 0


def _schema(_args: argparse.Namespace) -> int:
    from kiln.config import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
