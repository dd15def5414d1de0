"""The serve spec's colocation choice and the Serve config it yields (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.errors import SpecError
from kiln.inference.serve_spec import validate_serve_spec

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
