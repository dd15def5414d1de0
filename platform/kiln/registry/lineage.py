"""Lineage: what produced a model version (software environment, code commit, data fingerprint)."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

from kiln import __version__ as kiln_version

logger = logging.getLogger(__name__)

_PACKAGES = ("torch", "ray", "deepspeed", "pyarrow", "safetensors")
_GIT_TIMEOUT_S = 5.0


def environment(cwd: str | None = None) -> dict[str, Any]:
    """Describe the software environment of this process, for `lineage.json`.

    Args:
        cwd: Directory whose git checkout is recorded; the current directory by default.

    Returns:
        `python`, `kiln`, one key per package in torch/ray/deepspeed/pyarrow/safetensors (None when
        not installed), `hostname`, `git_commit` (None outside a git checkout or without git) and
        `git_dirty` (None when `git_commit` is None).
    """
    env: dict[str, Any] = {
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "kiln": kiln_version,
    }
    env.update({name: _package_version(name) for name in _PACKAGES})
    env["hostname"] = socket.gethostname()
    commit = _git(["rev-parse", "HEAD"], cwd)
    env["git_commit"] = commit or None
    status = _git(["status", "--porcelain"], cwd) if commit else None
    env["git_dirty"] = None if status is None else bool(status)
    return env


def data_fingerprint(files: list[tuple[str, int, float]]) -> str:
    """A sha256 hex digest over `(path, size, mtime)` triples, independent of their order.

    Cheap to compute on any store (no file is read), and it changes when a file is added, removed,
    resized or rewritten.
    """
    triples = sorted((str(path), int(size), float(mtime)) for path, size, mtime in files)
    return hashlib.sha256(json.dumps(triples).encode("utf-8")).hexdigest()


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: str | None) -> str | None:
    """The stripped stdout of a git command; None on any failure (no git, not a repo, timeout)."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("git %s failed: %s", " ".join(args), exc)
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()
