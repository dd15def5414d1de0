"""Shared fixtures: one local Ray per test session, generated datasets, a GPU mark."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.inference.serve_env import apply_serve_environment
from kiln.inference.serve_spec import HttpSpec

REPO = Path(__file__).resolve().parents[1]

# Every Ray this session starts serves the way `kiln serve` does by default: Ray Serve reads its
# ingress switches (HAProxy, throughput mode) at import, in each Ray process, so they are set
# before any test imports Ray.
apply_serve_environment(HttpSpec())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session (2 logical CPUs more than cores would hide
    resource-planning bugs, so it gets exactly this machine's CPUs), shut down at the end."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="kr-", dir="/tmp")  # short: Ray's socket paths are capped
    # ray.init turns token auth on by itself; a token in the environment keeps it from writing
    # one under ~/.ray (RAY_AUTH_MODE would be too late here: `import ray` caches it).
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def session_tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Where module- and session-scoped fixtures that train track their runs: they are set up
    before any test's own `tracking_store`, and must not write the checkout's .kiln either."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-session')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(autouse=True)
def tracking_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Each test's runs are tracked in its own MLflow store (exported as $MLFLOW_TRACKING_URI,
    so `kiln` subprocesses use it too), never in the checkout's ./.kiln/mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits as sharded Parquet (train/ and test/), written once per session."""
    from kiln.data.examples import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, shards=4, seed=0, overwrite=True)
    return out
