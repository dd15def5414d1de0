"""`kiln monitor REF`: drift of a served model's live inputs against its training data."""

from __future__ import annotations

import argparse
import os
from typing import Any

from kiln.cli.main import add_registry_flag, print_json


def add_commands(commands: Any) -> None:
    """Register `kiln monitor`."""
    monitor = commands.add_parser(
        "monitor",
        help="drift of a served model's live inputs against its training data, per feature",
        description="Ask a running kiln server (`kiln serve`) for the drift of a model's live "
        "inputs over a recent window: per feature the PSI and (numeric) KS against the training "
        "profile saved at registration, features over threshold first, and a one-line verdict. "
        "REF is the served name, NAME:VERSION for one version, or NAME@ALIAS (resolved in the "
        "registry).",
    )
    monitor.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    monitor.add_argument(
        "--window", default="1h", help="how far back to look: 90s, 15m, 1h, 2d (default: 1h)"
    )
    monitor.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)"
    )
    monitor.add_argument(
        "--token-env",
        default="KILN_API_TOKEN",
        metavar="VAR",
        help="environment variable with the bearer token, sent when set (default: KILN_API_TOKEN)",
    )
    monitor.add_argument("--all", action="store_true", help="list every feature, not the top 20")
    monitor.add_argument("--json", action="store_true", help="print the server's JSON document")
    add_registry_flag(monitor)
    monitor.set_defaults(handler=_monitor)


def _monitor(args: argparse.Namespace) -> int:
    from kiln.monitor.client import (
        MonitorError,
        fetch_drift,
        format_report,
        parse_window,
        split_ref,
    )

    parse_window(args.window)
    name, version, alias = split_ref(args.ref)
    if alias is not None:
        from kiln.registry import Registry

        version = str(Registry(args.registry).resolve(args.ref).version)
    token = os.environ.get(args.token_env) or None
    document = fetch_drift(args.url, name, window=args.window, version=version, token=token)
    if args.json:
        print_json(document)
        return 0
    if all(report["samples"] == 0 for report in document["versions"]):
        shown = f"{name}:{version}" if version else name
        raise MonitorError(
            f"no live traffic for {shown} in the last {args.window}: the server has counted no "
            "inputs to compare (send predictions, or widen --window)"
        )
    print(format_report(document, limit=None if args.all else 20))
    return 0
