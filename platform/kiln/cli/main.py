"""The `kiln` command line. Parses arguments, calls into the library, prints results.

User errors (KilnError) print one line without a traceback and exit 2; a training run that
failed (TrainingError, e.g. every retry after worker failures used up) exits 1; bugs keep their
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kiln import __version__
from kiln.errors import KilnError, TrainingError

DEFAULT_REGISTRY = "./.kiln/registry"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except TrainingError as exc:
        print(f"kiln: training failed: {exc}", file=sys.stderr)
        return 1
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also the source of every --help text)."""
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Train models on Ray + DeepSpeed from one YAML job spec; register them.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=lambda _args: _print_help(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    from kiln.cli import data_cmd, models_cmd, score_cmd, serve_cmd, train_cmd, tune_cmd

    train_cmd.add_commands(commands)
    data_cmd.add_commands(commands)
    models_cmd.add_commands(commands)
    score_cmd.add_commands(commands)
    serve_cmd.add_commands(commands)
    tune_cmd.add_commands(commands)
    from kiln.cli import k8s_cmd

    k8s_cmd.add_commands(commands)
    from kiln.cli import jobs_cmd

    jobs_cmd.add_commands(commands)
    from kiln.cli import retrain_cmd

    retrain_cmd.add_commands(commands)
    from kiln.cli import monitor_cmd

    monitor_cmd.add_commands(commands)
    from kiln.cli import runs_cmd

    runs_cmd.add_commands(commands)
    from kiln.cli import report_cmd

    report_cmd.add_commands(commands)
    return parser


def add_registry_flag(parser: argparse.ArgumentParser) -> None:
    """--registry, defaulting to $KILN_REGISTRY or ./.kiln/registry."""
    parser.add_argument(
        "--registry",
        default=os.environ.get("KILN_REGISTRY", DEFAULT_REGISTRY),
        help="registry root: a path or pyarrow filesystem URI "
        "(default: $KILN_REGISTRY or ./.kiln/registry)",
    )


def print_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="[kiln] %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("ray", "deepspeed", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
