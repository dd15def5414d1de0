"""`kiln score`: batch-score a dataset with a registered model (a Ray Data job)."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.main import add_registry_flag


def add_commands(commands: Any) -> None:
    """Register `kiln score` on the top-level subparsers."""
    score = commands.add_parser(
        "score",
        help="score a dataset with a registered model and write the predictions as Parquet",
        description="Read the input with Ray Data, score it with a pool of Predictor actors "
        "(the model's saved preprocessing included) and write one output row per input row: "
        "the key, the prediction, class probabilities (classification) and the model version. "
        "The output appears only when the job succeeds, with a _SUCCESS summary.",
    )
    score.add_argument("ref", help="model: NAME, NAME:VERSION or NAME@ALIAS (resolved once)")
    score.add_argument(
        "--input", required=True, help="file, directory, glob or URI (s3://, gs://, file://)"
    )
    score.add_argument(
        "--output",
        required=True,
        help="output directory (path or URI); must not exist or be empty, unless --overwrite",
    )
    score.add_argument(
        "--format",
        choices=["parquet", "csv", "jsonl"],
        default="parquet",
        help="input format (default: parquet)",
    )
    score.add_argument(
        "--batch-size", type=int, default=1024, help="rows per model call (default: 1024)"
    )
    score.add_argument(
        "--concurrency",
        type=_concurrency,
        default=(1, 1),
        metavar="MIN[:MAX]",
        help="scoring actors; the pool autoscales from MIN to MAX (default: 1)",
    )
    score.add_argument(
        "--on-error",
        choices=["fail", "quarantine"],
        default="fail",
        help="a row that cannot be scored fails the job naming its file and row (fail), or is "
        "written with its reason to OUTPUT/_errors/ (quarantine) (default: fail)",
    )
    score.add_argument(
        "--key",
        metavar="COLUMN",
        help="input column carried into the output to identify rows (default: a 'key' column "
        "of FILE:ROW, the file relative to --input and the row counted from 0)",
    )
    score.add_argument(
        "--cpus-per-worker", type=float, default=0.5, help="CPUs per scoring actor (default: 0.5)"
    )
    score.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs per scoring actor; above 0 scores on CUDA (default: 0)",
    )
    score.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    score.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    add_registry_flag(score)
    score.set_defaults(handler=_score)


def _concurrency(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        pair = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN or MIN:MAX, got {text!r}") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return pair


def _score(args: argparse.Namespace) -> int:
    from kiln.inference.batch import score

    try:
        summary = score(
            args.ref,
            registry=args.registry,
            input=args.input,
            output=args.output,
            fmt=args.format,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            on_error=args.on_error,
            key=args.key,
            num_cpus_per_actor=args.cpus_per_worker,
            num_gpus=args.gpus_per_worker,
            overwrite=args.overwrite,
            address=args.address,
        )
    finally:
        _shutdown_ray()
    print(
        f"scored {summary.rows_in} rows ({summary.rows_quarantined} quarantined) in "
        f"{summary.seconds:.1f} s ({summary.rows_per_s:,.0f} rows/s) with {summary.model} "
        f"-> {summary.output}"
    )
    if summary.rows_quarantined:
        print(f"quarantined rows, with the reason for each: {summary.output}/_errors/")
    return 0


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
