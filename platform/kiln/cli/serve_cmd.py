"""`kiln serve MODEL_REF | SPEC.yaml` serves online until Ctrl-C; `kiln serve build SPEC.yaml`
writes the Serve config file that `serve deploy` and a KubeRay RayService accept."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from kiln.cli.main import DEFAULT_REGISTRY, add_registry_flag

logger = logging.getLogger(__name__)

OVERRIDES_HELP = "dotted key=value overrides of the serve spec, values parsed as YAML"


def add_commands(commands: Any) -> None:
    """Register `kiln serve`."""
    serve = commands.add_parser(
        "serve",
        help="serve registered models over HTTP on Ray Serve (or write a Serve config)",
        description="Serve a registered model (`kiln serve digits-mlp@production`) or a serve "
        "spec with several models, canary splits and autoscaling (`kiln serve spec.yaml`) until "
        "Ctrl-C, which drains and stops. `kiln serve build spec.yaml > serve_config.yaml` writes "
        "a Serve config for `serve deploy` or a KubeRay RayService serveConfigV2. Endpoints: "
        "Open Inference Protocol v2 under /v2, POST /v1/models/NAME:predict, docs at /docs; "
        "language models: the OpenAI-compatible /v1/completions, /v1/chat/completions and "
        "/v1/models (point the openai client's base_url at /v1).",
    )
    serve.add_argument(
        "target", help="a model ref (NAME, NAME:VERSION, NAME@ALIAS), a serve spec YAML, or build"
    )
    serve.add_argument(
        "rest", nargs="*", metavar="ARG", help=f"after build: the spec; then {OVERRIDES_HELP}"
    )
    serve.add_argument("--host", help="bind address (default 127.0.0.1, or the spec's http.host)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000, or the spec's)")
    serve.add_argument(
        "--token-env",
        metavar="VAR",
        help="require `Authorization: Bearer $VAR` (e.g. KILN_API_TOKEN)",
    )
    serve.add_argument("--token-file", metavar="PATH", help="require the bearer token in PATH")
    serve.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )
    add_registry_flag(serve)
    # None marks "not given", so a spec file's own registry stays unless --registry is passed.
    serve.set_defaults(handler=_serve, registry=None)


def _serve(args: argparse.Namespace) -> int:
    from kiln.errors import KilnError

    if args.target == "build":
        if not args.rest:
            raise KilnError("kiln serve build needs a serve spec: kiln serve build SPEC.yaml")
        return _build(args, _spec(args, args.rest[0], args.rest[1:]))
    return _run(args, _spec(args, args.target, args.rest))


def _spec(args: argparse.Namespace, target: str, overrides: list[str]) -> Any:
    """A serve spec from a YAML file, or one model served from a ref; flags win over the file."""
    from kiln.errors import SpecError
    from kiln.inference.serve_spec import load_serve_spec, validate_serve_spec

    is_file = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    if is_file:
        spec = load_serve_spec(target, overrides)
    else:
        if overrides:
            raise SpecError(f"overrides {overrides} need a serve spec file, not a model ref")
        registry = args.registry or os.environ.get("KILN_REGISTRY", DEFAULT_REGISTRY)
        spec = validate_serve_spec({"registry": registry, "models": [{"ref": target}]})
    raw = spec.model_dump(mode="json", exclude_unset=True)
    if args.registry:
        raw["registry"] = args.registry
    if args.host or args.port:
        raw["http"] = {**raw.get("http", {}), **_given(host=args.host, port=args.port)}
    if args.token_env or args.token_file:
        raw["auth"] = _given(token_env=args.token_env, token_file=args.token_file)
    return validate_serve_spec(raw, source=target)


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _build(_args: argparse.Namespace, spec: Any) -> int:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from kiln.inference.serve import absolute_paths, serve_config

    config = serve_config(absolute_paths(spec))
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


def _run(args: argparse.Namespace, spec: Any) -> int:
    from kiln.inference import serve_env

    # On a cluster of its own, stopping takes Serve down; on a shared one, only this application.
    shared = bool(args.address or os.environ.get("RAY_ADDRESS"))
    # Ray Serve reads its ingress switches at import, in every Ray process: set them before the
    # Ray this command starts (and before this process imports Serve).
    ingress = None
    if not shared:
        serve_env.check_port_free(spec.http.host, spec.http.port)
        ingress = serve_env.describe(serve_env.apply_serve_environment(spec.http))

    import ray
    from ray import serve

    from kiln.inference.serve import absolute_paths, build_app, http_options
    from kiln.inference.serve_spec import load_token

    spec = absolute_paths(spec)
    load_token(spec.auth)  # fail before starting anything when the token is missing
    application = build_app(spec.model_dump(mode="json"))
    ray.init(address=args.address, runtime_env=spec.runtime_env or None)
    stop = _stop_on_signals()
    try:
        serve.start(http_options=http_options(spec))
        serve.run(application, name=spec.name, route_prefix=spec.route_prefix)
        _announce(
            spec, ingress or "ingress: the cluster's (RAY_SERVE_ENABLE_HA_PROXY on its nodes)"
        )
        while not stop.wait(0.5):
            pass
        print("kiln: draining and stopping", file=sys.stderr)
    finally:
        if shared:
            serve.delete(spec.name)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _announce(spec: Any, ingress: str) -> None:
    url = f"http://{spec.http.host}:{spec.http.port}{spec.route_prefix.rstrip('/')}"
    for model in spec.models:
        versions = ", ".join(f"{v.ref} (weight {v.weight:g})" for v in model.variants)
        print(f"serving {model.served_name}: {versions}")
    print(ingress)
    source = f"${spec.auth.token_env}" if spec.auth.token_env else spec.auth.token_file
    print(f"auth: bearer token from {source}" if source else "auth: off (no token configured)")
    print(
        f"ready at {url}  (OIP {url}/v2/models/NAME/infer, {url}/v1/models/NAME:predict, "
        f"language models: OpenAI-compatible base_url {url}/v1, docs {url}/docs); Ctrl-C stops",
        flush=True,
    )


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so the blocking wait ends and the finally drains."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return stop
