"""`kiln k8s render SPEC --kind train|tune|score|serve` prints the KubeRay manifests to apply."""

from __future__ import annotations

import argparse
import sys
from typing import Any

OVERRIDES_HELP = "dotted key=value overrides of the spec, values parsed as YAML"


def add_commands(commands: Any) -> None:
    """Register `kiln k8s`."""
    k8s = commands.add_parser(
        "k8s",
        help="Kubernetes (KubeRay) manifests for kiln specs",
        description="Kubernetes manifests for kiln specs. The base cluster, service and jobs "
        "live in k8s/ (kubectl apply -k k8s/overlays/cpu-dev).",
    )
    k8s.set_defaults(handler=lambda _args: _help(k8s))
    sub = k8s.add_subparsers(title="commands", metavar="COMMAND")
    render = sub.add_parser(
        "render",
        help="print the RayJob or RayService for a spec (YAML on stdout)",
        description="Render a job spec as a RayJob (train, tune, score: `python jobs/KIND.py "
        "SPEC` on a RayCluster sized from the spec, the spec in a ConfigMap beside it) or a "
        "serve spec as a RayService (serveConfigV2 from `kiln serve build`), plus "
        "NetworkPolicies. Relative paths in the spec move under /mnt/kiln, the shared volume. "
        "Needs the Secret kiln-ray-auth (key auth_token) in the namespace.",
    )
    render.add_argument("spec", help="YAML job spec, or a serve spec with --kind serve")
    render.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    render.add_argument(
        "--kind", choices=["train", "tune", "score", "serve"], default="train", help="what to run"
    )
    render.add_argument("--image", help="container image (default kiln:VERSION-cpu or -cuda)")
    render.add_argument("--namespace", help="namespace set on every resource")
    render.add_argument(
        "--claim",
        default="kiln-storage",
        help="PersistentVolumeClaim mounted at /mnt/kiln on every pod (default kiln-storage)",
    )
    render.set_defaults(handler=_render)


def _render(args: argparse.Namespace) -> int:
    from kiln.cluster.k8s import RenderOptions, dump_manifests, render_job, render_service

    options = RenderOptions(image=args.image, namespace=args.namespace, claim=args.claim)
    if args.kind == "serve":
        from kiln.inference.serve_spec import load_serve_spec

        documents = render_service(load_serve_spec(args.spec, args.overrides), options)
    else:
        from kiln.config import load_spec

        documents = render_job(load_spec(args.spec, args.overrides), args.kind, options)
    sys.stdout.write(dump_manifests(documents))
    return 0


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0
