"""`kiln score`: batch-score a dataset with a registered model, or complete its prompts with a
registered language model (`--task generate`); a Ray Data job either way."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.main import add_registry_flag
from kiln.cli.runs_cmd import add_tracking_flags


def add_commands(commands: Any) -> None:
    """Register `kiln score` on the top-level subparsers."""
    score = commands.add_parser(
        "score",
        help="score a dataset with a registered model and write the predictions as Parquet",
        description="Read the input with Ray Data, score it with a pool of Predictor actors "
        "(the model's saved preprocessing included) and write one output row per input row: "
        "the key, the prediction, class probabilities (classification) and the model version. "
        "The output appears only when the job succeeds, with a _SUCCESS summary. With --task "
        "generate, a language model completes each row's prompt instead: key, prompt, "
        "completion, prompt_tokens, completion_tokens, finish_reason and model per row.",
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
        "--batch-size",
        type=int,
        help="rows per model call (default: 1024; 16 with --task generate)",
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
    _add_generation_flags(score)
    add_registry_flag(score)
    add_tracking_flags(score)
    score.set_defaults(handler=_score)


def _add_generation_flags(score: argparse.ArgumentParser) -> None:
    group = score.add_argument_group("batch generation (--task generate, language models)")
    group.add_argument(
        "--task",
        choices=["predict", "generate"],
        default="predict",
        help="predict: score rows with a tabular model; generate: complete each row's prompt "
        "with a language model (default: predict)",
    )
    group.add_argument(
        "--prompt-column", default="prompt", help="column of prompt text (default: prompt)"
    )
    group.add_argument(
        "--max-tokens", type=int, default=16, help="most tokens per completion (default: 16)"
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy decoding (default: 0)",
    )
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    group.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="a string that ends a completion (repeat for several)",
    )
    group.add_argument("--seed", type=int, help="sampling seed (the same for every row)")


def _concurrency(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        pair = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN or MIN:MAX, got {text!r}") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return pair


def _generate_options(args: argparse.Namespace) -> Any:
    """Generation options for --task generate; None (and no generation flags) for predict."""
    from kiln.errors import KilnError
    from kiln.inference.batch import GenerateOptions

    options = GenerateOptions(
        prompt_column=args.prompt_column,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    if args.task == "generate":
        return options
    if options != GenerateOptions():
        raise KilnError(
            "--prompt-column, --max-tokens, --temperature, --top-p, --top-k, --stop and --seed "
            "need --task generate"
        )
    return None


def _score(args: argparse.Namespace) -> int:
    from kiln.inference.batch import score
    from kiln.tracking.jobs import finish_score

    generate = _generate_options(args)
    batch_size = args.batch_size or (16 if generate else 1024)
    tracker = _tracker(args, batch_size)
    try:
        summary = score(
            args.ref,
            registry=args.registry,
            input=args.input,
            output=args.output,
            fmt=args.format,
            batch_size=batch_size,
            concurrency=args.concurrency,
            on_error=args.on_error,
            key=args.key,
            num_cpus_per_actor=args.cpus_per_worker,
            num_gpus=args.gpus_per_worker,
            overwrite=args.overwrite,
            address=args.address,
            task=args.task,
            generate=generate,
        )
    except BaseException as exc:
        tracker.fail(exc)
        raise
    finally:
        _shutdown_ray()
    finish_score(tracker, summary)
    if generate:
        print(
            f"generated completions for {summary.rows_out} of {summary.rows_in} prompts "
            f"({summary.rows_quarantined} quarantined) in {summary.seconds:.1f} s with "
            f"{summary.model} -> {summary.output}"
        )
        if summary.rows_quarantined:
            print(f"quarantined rows, with the reason for each: {summary.output}/_errors/")
        return 0
    print(
        f"scored {summary.rows_in} rows ({summary.rows_quarantined} quarantined) in "
        f"{summary.seconds:.1f} s ({summary.rows_per_s:,.0f} rows/s) with {summary.model} "
        f"-> {summary.output}"
    )
    if summary.rows_quarantined:
        print(f"quarantined rows, with the reason for each: {summary.output}/_errors/")
    if summary.drift:
        verdict = summary.drift["verdict"]
        print(f"input drift: {verdict} (per feature: {summary.output}/_drift.json)")
    return 0


def _tracker(args: argparse.Namespace, batch_size: int) -> Any:
    """The tracked `score` run (`Tracker.off()` with --no-tracking)."""
    from kiln.config.spec import TrackingSpec
    from kiln.tracking.jobs import score_tracker

    settings = TrackingSpec(enabled=not args.no_tracking, uri=args.tracking_uri)
    params = {
        "input": args.input,
        "format": args.format,
        "task": args.task,
        "batch_size": batch_size,
        "concurrency": ":".join(map(str, args.concurrency)),
        "on_error": args.on_error,
        "key": args.key,
        "registry": args.registry,
    }
    return score_tracker(settings, ref=args.ref, output=args.output, params=params)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
