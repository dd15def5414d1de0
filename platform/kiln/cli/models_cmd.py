"""`kiln models list|show|promote`: browse the registry and move aliases."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.main import add_registry_flag, print_json


def add_commands(commands: Any) -> None:
    """Register `kiln models ...`."""
    models = commands.add_parser("models", help="list, inspect and promote registered models")
    sub = models.add_subparsers(title="models commands", metavar="COMMAND", required=True)

    listing = sub.add_parser("list", help="every model version with its aliases and metric")
    listing.add_argument("name", nargs="?", help="only this model")
    add_registry_flag(listing)
    listing.set_defaults(handler=_list)

    show = sub.add_parser("show", help="manifest, metrics, lineage of NAME, NAME:V or NAME@ALIAS")
    show.add_argument("ref")
    add_registry_flag(show)
    show.set_defaults(handler=_show)

    verify = sub.add_parser(
        "verify", help="check every file of a version against its manifest and rebuild the model"
    )
    verify.add_argument("ref")
    add_registry_flag(verify)
    verify.set_defaults(handler=_verify)

    promote = sub.add_parser("promote", help="point ALIAS (e.g. production) at a model version")
    promote.add_argument("ref", help="NAME:VERSION, NAME@ALIAS or NAME (latest)")
    promote.add_argument("alias")
    add_registry_flag(promote)
    promote.set_defaults(handler=_promote)


def _list(args: argparse.Namespace) -> int:
    from kiln.registry import Registry

    registry = Registry(args.registry)
    names = [args.name] if args.name else registry.names()
    if not names:
        print(f"no models in {args.registry}")
        return 0
    print(f"{'MODEL':<32} {'CREATED':<20} {'METRIC':<26} ALIASES")
    for name in names:
        aliases = registry.aliases(name)
        versions = registry.versions(name)
        for mv in versions:
            tags = [alias for alias, v in aliases.items() if v == mv.version]
            if mv is versions[-1]:
                tags.insert(0, "latest")
            print(
                f"{mv.ref:<32} {mv.created_at[:19]:<20} {_metric(registry, mv):<26} "
                f"{','.join(tags)}"
            )
    return 0


def _show(args: argparse.Namespace) -> int:
    from kiln.registry import Registry

    print_json(Registry(args.registry).show(args.ref))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from kiln.registry import Registry
    from kiln.registry.model import load_model

    model = load_model(Registry(args.registry), args.ref)
    files = len(model.loaded.manifest["files"])
    params = sum(p.numel() for p in model.module.parameters())
    print(f"{model.ref}: {files} files verified, {params} parameters loaded")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from kiln.registry import Registry

    mv = Registry(args.registry).promote(args.ref, args.alias)
    print(f"{mv.name}@{args.alias} -> {mv.ref}")
    return 0


def _metric(registry: Any, mv: Any) -> str:
    try:
        metrics = registry.read_document(mv, "metrics.json")
    except Exception:
        return "-"
    name = metrics.get("metric")
    value = metrics.get("best", {}).get(name)
    return f"{name}={value:.4f}" if isinstance(value, float) else "-"
