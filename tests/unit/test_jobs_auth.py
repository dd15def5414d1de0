"""Where `kiln submit`/`kiln jobs` find the Ray auth token, and the exit codes of a job."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.jobs import exit_code_for, find_token


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_CLUSTER_DIR", str(tmp_path / "cluster"))


def test_token_order_env_then_path_then_local_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert find_token() is None
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "auth_token").write_text("local-token\n")
    token = find_token()
    assert token is not None and token.value == "local-token"
    assert token.headers() == {"Authorization": "Bearer local-token"}
    (tmp_path / "other").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other"))
    assert find_token().value == "path-token"  # type: ignore[union-attr]
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert find_token().value == "env-token"  # type: ignore[union-attr]


def test_unreadable_or_empty_token_file_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(KilnError, match=r"RAY_AUTH_TOKEN_PATH=.*missing: cannot read"):
        find_token()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
    with pytest.raises(KilnError, match="empty"):
        find_token()


def test_exit_codes_mirror_the_job() -> None:
    assert exit_code_for("SUCCEEDED", 0) == 0
    assert exit_code_for("FAILED", 1) == 1
    assert exit_code_for("FAILED", None) == 1
    assert exit_code_for("FAILED", 2) == 2  # a user error inside the job
    assert exit_code_for("STOPPED", None) == 3
