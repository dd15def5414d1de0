"""`kiln report RUN_ID --output report.html`: the report of a tracked run as one HTML page."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.main import DEFAULT_REGISTRY
from kiln.cli.runs_cmd import URI_HELP


def add_commands(commands: Any) -> None:
    """Register `kiln report`."""
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a tracked run: curves, evaluation, trials, speed",
    )
    report.add_argument(
        "run_id",
        metavar="RUN_ID",
        help="a run id, a unique prefix of one, or `latest` (the newest run, of --kind if given)",
    )
    report.add_argument(
        "--kind",
        choices=["train", "tune", "trial", "score", "retrain"],
        help="with RUN_ID `latest`: the newest run of this kind",
    )
    report.add_argument(
        "--output",
        "-o",
        default="report.html",
        help="the page to write (default: report.html); its PNGs go to <name>_files/ beside it",
    )
    report.add_argument("--tracking-uri", help=URI_HELP)
    report.add_argument(
        "--registry",
        default=None,
        help="registry root holding the run's model (default: the run's spec, else "
        f"$KILN_REGISTRY or {DEFAULT_REGISTRY})",
    )
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    import os

    from kiln.errors import KilnError
    from kiln.report import build_report
    from kiln.tracking import open_store

    store = open_store(args.tracking_uri)
    if args.run_id == "latest":
        newest = store.list(kind=args.kind, limit=1)
        if not newest:
            kind = f"{args.kind} " if args.kind else ""
            raise KilnError(f"kiln report latest: no {kind}run in the tracking store {store.uri}")
        record = store.get(newest[0].run_id)
    elif args.kind:
        raise KilnError("--kind goes with RUN_ID `latest` only")
    else:
        record = store.get(args.run_id)
    registry = args.registry or (
        None if "registry" in record.params else os.environ.get("KILN_REGISTRY")
    )
    page, report = build_report(record, args.output, store=store, registry=registry)
    print(page)
    for figure in report.figures:
        print(f"  {figure.path}  {figure.title}")
    for note in report.all_notes:
        print(f"  note: {note}")
    return 0
