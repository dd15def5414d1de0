"""The cloud cluster-launcher YAML and the runtime_env examples under cluster/ load the way Ray
loads them: the launcher config against Ray's own ray-schema.json plus `ray up`'s preparation,
the runtime_envs through `ray.runtime_env.RuntimeEnv`. No Ray is started."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "cluster" / "launcher" / "aws-gpu.yaml"
RUNTIME_ENVS = sorted((ROOT / "cluster" / "runtime_env").glob("*.yaml"))


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def _project_version() -> str:
    from kiln import __version__

    return __version__


def test_launcher_config_passes_ray_up_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    jsonschema.validate(config, _ray_schema())
    # What `ray up` does before it talks to the cloud: fill defaults, then validate again.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_launcher_has_cpu_head_and_autoscaling_gpu_workers_on_the_project_image() -> None:
    config = _launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    (gpu_group,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_group["resources"]["GPU"] >= 1
    assert gpu_group["min_workers"] == 0 < gpu_group["max_workers"] <= config["max_workers"]
    version = _project_version()
    assert config["docker"]["head_image"] == f"kiln:{version}-cpu"
    assert config["docker"]["worker_image"] == f"kiln:{version}-cuda"
    assert "--gpus all" in config["docker"]["worker_run_options"]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if "ray start" in cmd)
    # kiln's serve defaults reach every Ray process (Serve reads them at import).
    from kiln.inference.serve_env import serve_environment
    from kiln.inference.serve_spec import HttpSpec

    defaults = serve_environment(HttpSpec(), local=False)
    for cmd in (c for c in starts if "ray start" in c):
        assert all(f"{key}={value}" in cmd for key, value in defaults.items()), cmd
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_a_misspelled_launcher_field_is_refused_by_rays_schema() -> None:
    config = _launcher()
    config["available_node_types"]["gpu-workers"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, _ray_schema())


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=lambda p: p.name)
def test_runtime_env_examples_load_with_rays_runtime_env(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(path.read_text())
    # Ray checks that local paths exist, relative to where `ray job submit` runs: the repo root,
    # where a built wheel would be at dist/ (stand one in under a copy of the layout).
    wheels = [m for m in raw.get("py_modules", []) if str(m).endswith(".whl")]
    if wheels:
        for wheel in wheels:
            assert Path(wheel).name == f"kiln-{_project_version()}-py3-none-any.whl"
            (tmp_path / wheel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / wheel).write_bytes(b"")
        monkeypatch.chdir(tmp_path)
    else:
        monkeypatch.chdir(ROOT)
    env = RuntimeEnv(**raw)
    assert env.get("working_dir") == raw.get("working_dir")
    assert all(isinstance(v, str) for v in (env.get("env_vars") or {}).values())
    assert ".venv/" in raw.get("excludes", [".venv/"]), "never upload the virtualenv"


def test_runtime_env_examples_exist() -> None:
    names = {p.name for p in RUNTIME_ENVS}
    assert {"working-dir.yaml", "wheel.yaml", "gpu-nccl.yaml"} <= names


def test_a_bad_runtime_env_is_refused() -> None:
    from ray.runtime_env import RuntimeEnv

    with pytest.raises((TypeError, ValueError)):
        RuntimeEnv(env_vars={"NCCL_DEBUG": 1})  # type: ignore[dict-item]
