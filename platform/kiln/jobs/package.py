"""What a submitted job carries: the resolved spec, the entrypoints and kiln itself.

The spec is loaded, overridden and validated here (a bad field fails before anything is
uploaded), its local paths made absolute (the job's working directory is an unpacked copy, not
the folder the user typed them in), and written into a staging folder that becomes the job's
`working_dir`. Three ways to bring the code:

- `dir` (default): a copy of the project (without .venv, data, .kiln, out, caches) as the
  working_dir, and the kiln package this client runs as a `py_modules` entry, put first on every
  worker's PYTHONPATH. Ray uploads both to the cluster (content-hashed, cached) and every node
  unpacks them into its own session folder.
- `wheel`: for large projects. A wheel of the kiln project travels inside the working_dir beside
  jobs/ and the spec; Ray's pip plugin installs it (`--no-deps`: the cluster's image already has
  the dependencies) into the job's virtualenv.
- `none`: nothing uploaded but the spec; the cluster already has this project at the same path
  (a shared filesystem, or an image built from it). The entrypoint and PYTHONPATH are absolute.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kiln
from kiln import storage
from kiln.config import dump_spec, load_spec, validate_spec
from kiln.config.spec import JobSpec
from kiln.errors import KilnError

logger = logging.getLogger(__name__)

KINDS = ("train", "tune", "score")
PACKAGE_MODES = ("dir", "wheel", "none")
SPEC_PATH = "_kiln_job/spec.yaml"
"""Where the resolved spec lies inside the job's working directory."""
TOP_LEVEL_EXCLUDES = (".git", ".venv", "venv", "data", ".kiln", "out", "build", "dist")
"""Never shipped from the project's top level: environments, data, local runs and registry."""
EXCLUDES = (
    "__pycache__",
    "node_modules",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "*.pyc",
)
"""Never shipped from any folder: caches and build metadata."""
MAX_UPLOAD_BYTES = 200 * 2**20
"""Above this the working_dir copy is refused in favour of `--package wheel` (Ray's own limit
for one package is 500 MiB, and every node downloads it)."""

# Spec fields that hold locations: relative ones are resolved against the submitter's folder.
_LOCATIONS = (
    ("data", "train"),
    ("data", "validation"),
    ("train", "storage"),
    ("registry",),
    ("score", "input"),
    ("score", "output"),
)


@dataclass
class JobPackage:
    """A job ready to submit; `cleanup()` removes the local staging folder afterwards."""

    kind: str
    spec: JobSpec
    entrypoint: str
    runtime_env: dict[str, Any]
    staging: Path
    notes: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def build_package(
    spec_path: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    kind: str = "train",
    mode: str = "dir",
    project: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> JobPackage:
    """Resolve the spec and stage what the job needs.

    Args:
        spec_path: the YAML job spec.
        overrides: dotted `key=value` overrides, applied before validation.
        kind: train, tune or score: which `jobs/<kind>.py` runs.
        mode: dir, wheel or none (see the module docstring).
        project: the folder holding `jobs/<kind>.py`; default: this folder if it has one, else
            the project kiln is installed from.
        env_vars: extra environment variables for the job.

    Raises:
        KilnError: a bad spec, a kind the spec has no section for, no project, a project too
            large to upload as a directory, or a wheel that does not build.
    """
    if kind not in KINDS:
        raise KilnError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if mode not in PACKAGE_MODES:
        raise KilnError(f"--package must be one of {', '.join(PACKAGE_MODES)}, got {mode!r}")
    spec = resolve_spec(spec_path, overrides, kind=kind)
    root = find_project(project, kind)
    staging = Path(tempfile.mkdtemp(prefix="kiln-job-"))
    try:
        package = _stage(spec, kind, mode, root, staging, dict(env_vars or {}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return package


def resolve_spec(spec_path: str, overrides: list[str] | tuple[str, ...], *, kind: str) -> JobSpec:
    """The validated spec with overrides applied and local locations made absolute."""
    spec = load_spec(spec_path, list(overrides))
    if kind == "tune" and spec.tune is None:
        raise KilnError(f"{spec_path}: --kind tune needs a `tune` section in the spec")
    if kind == "score" and spec.score is None:
        raise KilnError(f"{spec_path}: --kind score needs a `score` section in the spec")
    raw = spec.model_dump(mode="json")
    for path in _LOCATIONS:
        node = raw
        for part in path[:-1]:
            node = node.get(part) or {}
        value = node.get(path[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not storage.is_uri(value):
            node[path[-1]] = os.path.abspath(value)
    return validate_spec(raw, source=spec_path)


def find_project(project: str | None, kind: str) -> Path:
    """The folder whose `jobs/<kind>.py` the job runs."""
    entry = Path("jobs", f"{kind}.py")
    candidates = [Path(project)] if project else [Path.cwd(), _kiln_source_project()]
    for candidate in candidates:
        if candidate is not None and (candidate / entry).is_file():
            return candidate.resolve()
    where = project or "this folder or the kiln checkout"
    raise KilnError(f"--project: no {entry} in {where}")


def _kiln_source_project() -> Path:
    # An editable install: platform/kiln/__init__.py -> the project root two levels up.
    return Path(kiln.__file__).resolve().parents[2]


def _stage(
    spec: JobSpec, kind: str, mode: str, root: Path, staging: Path, env_vars: dict[str, str]
) -> JobPackage:
    work = staging / "job"
    notes: list[str] = []
    runtime_env: dict[str, Any] = {"working_dir": str(work)}
    entrypoint = f"python jobs/{kind}.py {SPEC_PATH}"
    if mode == "dir":
        shutil.copytree(root, work, ignore=_ignore(root), symlinks=True)
        _check_size(work)
        runtime_env["py_modules"] = [str(Path(kiln.__file__).resolve().parent)]
        # Gitignore syntax: a bare name matches at any depth (kiln/data is a package).
        runtime_env["excludes"] = list(EXCLUDES)
    elif mode == "wheel":
        shutil.copytree(root / "jobs", work / "jobs", ignore=shutil.ignore_patterns(*EXCLUDES))
        wheel = _build_wheel(_kiln_source_project(), work / "wheels")
        runtime_env["pip"] = {
            "packages": [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/wheels/{wheel.name}"],
            "pip_install_options": ["--no-deps", "--disable-pip-version-check"],
            "pip_check": False,
        }
        notes.append(f"kiln shipped as {wheel.name}")
    else:
        work.mkdir()
        entrypoint = f"python {root / 'jobs' / f'{kind}.py'} {SPEC_PATH}"
        pythonpath = str(Path(kiln.__file__).resolve().parents[1])
        env_vars.setdefault("PYTHONPATH", pythonpath)
        notes.append(f"using the project at {root} on the cluster's own filesystem")
    spec_file = work / SPEC_PATH
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(dump_spec(spec))
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return JobPackage(kind, spec, entrypoint, runtime_env, staging, notes)


def _ignore(root: Path) -> Any:
    """copytree's ignore: top-level excludes only at the root, the others at any depth."""
    anywhere = shutil.ignore_patterns(*EXCLUDES)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(anywhere(folder, names))
        if Path(folder).resolve() == root:
            skipped |= {name for name in names if name in TOP_LEVEL_EXCLUDES}
        return skipped

    return ignore


def _check_size(work: Path) -> None:
    total = sum(f.stat().st_size for f in work.rglob("*") if f.is_file() and not f.is_symlink())
    if total > MAX_UPLOAD_BYTES:
        raise KilnError(
            f"--package dir: the project is {total / 2**20:.0f} MiB after excludes (limit "
            f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB); use --package wheel, or move data out of it"
        )


def _build_wheel(project: Path, out: Path) -> Path:
    """Build kiln's wheel from a copy of its sources, so the checkout gets no build/ or egg-info."""
    if not (project / "pyproject.toml").is_file():
        raise KilnError(f"--package wheel: no pyproject.toml in {project} to build kiln from")
    source = out.parent.parent / "wheel-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg"):
        if (project / name).is_file():
            shutil.copy2(project / name, source / name)
    shutil.copytree(project / "platform", source / "platform", ignore=_ignore(project))
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    command += ["--no-build-isolation", str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wheels = sorted(out.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise KilnError(f"--package wheel: building the kiln wheel failed: {' | '.join(tail)}")
    return wheels[0]
