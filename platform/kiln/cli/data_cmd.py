"""`kiln data example` and `kiln data synth`: datasets for demos, tests and scale runs."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.main import print_json

EXAMPLES = ("digits", "python-stdlib")


def add_commands(commands: Any) -> None:
    """Register `kiln data ...`."""
    data = commands.add_parser(
        "data", help="write example or synthetic datasets as sharded Parquet"
    )
    sub = data.add_subparsers(title="data commands", metavar="COMMAND", required=True)

    example = sub.add_parser(
        "example",
        help="write a real dataset this machine already has (digits: scikit-learn's handwritten "
        "digits; python-stdlib: this Python's standard library sources, a text corpus)",
        description="digits: 1797 8x8 images, 64 pixel columns and label, 80/20 stratified "
        "train/ and test/. python-stdlib: one row per .py file of this interpreter's standard "
        "library (its test suite included; site-packages and non-UTF-8 files skipped), columns "
        "path and text, about 5% of files in validation/ by a hash of the path, plus "
        "prompts.parquet (16 function signatures from validation files, column prompt).",
    )
    example.add_argument("name", choices=EXAMPLES)
    example.add_argument(
        "out",
        help="output directory (digits: train/ and test/; "
        "python-stdlib: train/, validation/ and prompts.parquet)",
    )
    example.add_argument(
        "--shards",
        type=int,
        default=4,
        help="Parquet files per split (python-stdlib: the training split; validation gets one "
        "per 20, at least one)",
    )
    example.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the fixed split (digits: train/test; python-stdlib: which files are "
        "validation, which signatures are prompts)",
    )
    example.add_argument("--overwrite", action="store_true", help="replace existing output")
    example.set_defaults(handler=_example)

    synth = sub.add_parser("synth", help="write large synthetic classification/regression data")
    synth.add_argument("out", help="output directory (gets train/ and test/)")
    synth.add_argument("--rows", type=int, required=True, help="total rows (train + test)")
    synth.add_argument("--features", type=int, required=True, help="numeric feature columns")
    synth.add_argument("--classes", type=int, default=2, help="classes (classification)")
    synth.add_argument("--shards", type=int, default=4, help="Parquet files per split")
    synth.add_argument("--task", choices=("classification", "regression"), default="classification")
    synth.add_argument("--categorical", type=int, default=0, help="extra string columns")
    synth.add_argument(
        "--missing-fraction", type=float, default=0.0, help="fraction of feature values set missing"
    )
    synth.add_argument("--test-fraction", type=float, default=0.1, help="rows held out as test/")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_synth)


def _example(args: argparse.Namespace) -> int:
    from kiln.data.examples import write_digits, write_python_stdlib

    write = write_python_stdlib if args.name == "python-stdlib" else write_digits
    summary = write(args.out, shards=args.shards, seed=args.seed, overwrite=args.overwrite)
    print_json(summary)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from kiln.data.examples import write_synth

    summary = write_synth(
        args.out,
        rows=args.rows,
        features=args.features,
        classes=args.classes,
        shards=args.shards,
        task=args.task,
        categorical=args.categorical,
        missing_fraction=args.missing_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    print_json(summary)
    return 0
