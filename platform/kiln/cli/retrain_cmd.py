"""`kiln retrain`: warm-start fine-tuning from a registered model, with a gated promotion."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kiln.cli.train_cmd import OVERRIDES_HELP

EXIT_REFUSED = 3
"""Exit status when the new version is registered but the gate keeps the alias where it was."""


def add_commands(commands: Any) -> None:
    """Register `kiln retrain` on the top-level subparsers."""
    retrain = commands.add_parser(
        "retrain",
        help="fine-tune a registered model on new data; promote it only if it holds up",
        description="Start from a registered model's weights and fitted preprocessing, train on "
        "--data (replacing data.train), score the old and the new version on the same holdout "
        "(retrain.holdout, default data.validation) and move the alias to the new version only "
        "if its metric is not worse than the old one's by more than the margin. The new "
        "version is registered either way, with the decision and both scores in its lineage. "
        f"Exit status: 0 promoted, {EXIT_REFUSED} registered but not promoted, 2 a user "
        "error, 1 a failed run.",
    )
    retrain.add_argument("spec", help="YAML job spec describing the registered model")
    retrain.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    retrain.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="REF",
        help="the model to start from: NAME, NAME:VERSION or NAME@ALIAS",
    )
    retrain.add_argument("--data", metavar="PATH", help="new training data (replaces data.train)")
    retrain.add_argument(
        "--holdout", metavar="PATH", help="held-out data both versions are scored on"
    )
    retrain.add_argument(
        "--margin", type=float, help="how much worse (in the metric's units) the new may score"
    )
    retrain.add_argument(
        "--freeze",
        nargs="+",
        metavar="PREFIX",
        help="parameter-name prefixes kept at the registered weights (e.g. blocks.0)",
    )
    retrain.add_argument("--alias", help="alias moved to the new version (default production)")
    retrain.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    retrain.set_defaults(handler=_retrain)


def _retrain(args: argparse.Namespace) -> int:
    from kiln.cli.train_cmd import _shutdown_ray
    from kiln.config import load_spec
    from kiln.train.retrain import describe_decision, retrain, with_retrain_options

    spec = with_retrain_options(
        load_spec(args.spec, args.overrides),
        data=args.data,
        holdout=args.holdout,
        margin=args.margin,
        freeze=args.freeze,
        alias=args.alias,
    )
    try:
        outcome = retrain(spec, args.source, address=args.address)
    finally:
        _shutdown_ray()
    new = outcome.train.model.ref
    print(f"registered {new} (best epoch {outcome.train.best_epoch}), from {outcome.source.ref}")
    print(f"run dir: {outcome.train.run_dir}")
    message = describe_decision(outcome.decision, new)
    if outcome.promoted:
        print(message)
        return 0
    print(f"kiln: retrain refused: {message}", file=sys.stderr)
    return EXIT_REFUSED
