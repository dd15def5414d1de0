"""`kiln submit`'s packaging: the resolved spec, what is shipped, the entrypoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.errors import KilnError, SpecError
from kiln.jobs import build_package
from kiln.jobs.package import SPEC_PATH

SPEC = """
name: digits
data: {train: data/digits/train, validation: data/digits/test, label: label}
train: {num_workers: 2, batch_size: 64, storage: ./.kiln/runs}
registry: s3://bucket/registry
score: {input: data/digits/test, output: out/scores, concurrency: 2}
"""


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A user project: entrypoints, a package with a `data` module, data and local state."""
    for entry in ("train", "tune", "score"):
        (tmp_path / "jobs").mkdir(exist_ok=True)
        (tmp_path / "jobs" / f"{entry}.py").write_text("print('hi')\n")
    (tmp_path / "mypkg" / "data").mkdir(parents=True)
    (tmp_path / "mypkg" / "data" / "reader.py").write_text("X = 1\n")
    (tmp_path / "mypkg" / "__pycache__").mkdir()
    (tmp_path / "mypkg" / "__pycache__" / "x.pyc").write_bytes(b"0")
    for heavy in ("data", ".kiln", ".venv", "out"):
        (tmp_path / heavy).mkdir(exist_ok=True)
        (tmp_path / heavy / "big.bin").write_bytes(b"0" * 1000)
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def test_dir_package_ships_project_without_data_and_an_absolute_spec(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    package = build_package("spec.yaml", ["train.placement=SPREAD"], kind="train")
    try:
        work = Path(package.runtime_env["working_dir"])
        assert package.entrypoint == f"python jobs/train.py {SPEC_PATH}"
        assert (work / "jobs" / "train.py").is_file()
        # A nested package called `data` is code; only the top-level data folder is left out.
        assert (work / "mypkg" / "data" / "reader.py").is_file()
        for left_out in ("data", ".kiln", ".venv", "out", "mypkg/__pycache__"):
            assert not (work / left_out).exists(), left_out
        shipped = yaml.safe_load((work / SPEC_PATH).read_text())
        assert shipped["train"]["placement"] == "SPREAD"
        assert shipped["data"]["train"] == str(project / "data" / "digits" / "train")
        assert shipped["train"]["storage"] == str(project / ".kiln" / "runs")
        assert shipped["registry"] == "s3://bucket/registry"  # URIs stay as given
        assert shipped["score"]["output"] == str(project / "out" / "scores")
        kiln_dir = Path(package.runtime_env["py_modules"][0])
        assert (kiln_dir / "data" / "__init__.py").is_file()
        assert "data" not in package.runtime_env["excludes"]
    finally:
        package.cleanup()
    assert not work.exists()


def test_none_package_uses_absolute_paths_and_pythonpath(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    package = build_package("spec.yaml", kind="score", mode="none")
    try:
        assert package.entrypoint == f"python {project / 'jobs' / 'score.py'} {SPEC_PATH}"
        assert package.runtime_env["env_vars"]["PYTHONPATH"].endswith("platform")
        work = Path(package.runtime_env["working_dir"])
        assert sorted(p.name for p in work.iterdir()) == ["_kiln_job"]
    finally:
        package.cleanup()


def test_bad_spec_kind_and_project_fail_before_anything_is_staged(
    project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(project)
    with pytest.raises(SpecError, match=r"train\.num_workers"):
        build_package("spec.yaml", ["train.num_workers=0"])
    with pytest.raises(KilnError, match="--kind tune needs a `tune` section"):
        build_package("spec.yaml", kind="tune")
    with pytest.raises(KilnError, match="--kind must be one of"):
        build_package("spec.yaml", kind="serve")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KilnError, match=r"--project: no jobs/train\.py"):
        build_package("spec.yaml", project=str(empty))
