"""The Ray auth token a client sends, found where Ray and `cluster/local.sh` put it.

Ray's token authentication (`RAY_AUTH_MODE=token`) guards the Jobs API: no token answers 401, a
wrong one 403. kiln sends the token itself as `Authorization: Bearer ...`, so it works whatever
auth mode this client process's Ray believes in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

LOCAL_CLUSTER_DIR = ".kiln/cluster"
"""Where `cluster/local.sh` keeps its state (override: $KILN_CLUSTER_DIR)."""
TOKEN_FILE = "auth_token"


@dataclass(frozen=True)
class AuthToken:
    value: str
    source: str
    """Where it came from, for messages (never the token itself)."""

    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate to Ray's dashboard and Jobs API."""
        return {"Authorization": f"Bearer {self.value}"}


def local_cluster_dir() -> Path:
    """The state folder of `cluster/local.sh` as seen from here."""
    return Path(os.environ.get("KILN_CLUSTER_DIR") or LOCAL_CLUSTER_DIR)


def find_token() -> AuthToken | None:
    """The token to send, in Ray's order: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, then the
    local cluster's token file. None when there is none (the cluster may not need one).

    Raises:
        KilnError: RAY_AUTH_TOKEN_PATH names a file that cannot be read or is empty.
    """
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return AuthToken(value, "$RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        return _read(Path(path), "$RAY_AUTH_TOKEN_PATH")
    local = local_cluster_dir() / TOKEN_FILE
    if local.is_file():
        return _read(local, str(local))
    return None


def _read(path: Path, source: str) -> AuthToken:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise KilnError(f"{source}={path}: cannot read the auth token ({exc.strerror})") from None
    if not value:
        raise KilnError(f"{source}={path}: the auth token file is empty")
    return AuthToken(value, f"{source} ({path})" if not source.endswith(str(path)) else source)
