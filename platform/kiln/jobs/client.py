"""A thin layer over Ray's JobSubmissionClient: auth errors a user can act on, follow, stop.

Every call goes to the cluster's Jobs API (the dashboard, `http://HEAD:8265`). The token found by
`kiln.jobs.auth` is sent on every request, the log stream included.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, TextIO

from kiln.errors import KilnError
from kiln.jobs.auth import AuthToken, find_token, local_cluster_dir

logger = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
"""`kiln submit --follow` exits with these; a job whose entrypoint exited 2 (a user error in the
spec or data, named in its log) exits 2."""


def default_address() -> str:
    """$RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, the local cluster's, or 127.0.0.1:8265."""
    import os

    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    port_file = local_cluster_dir() / "dashboard_port"
    port = port_file.read_text().strip() if port_file.is_file() else "8265"
    return f"http://127.0.0.1:{port}"


def status_of(info: Any) -> str:
    """A JobInfo's status as plain text (SUCCEEDED, FAILED, ...)."""
    return str(getattr(info.status, "value", info.status))


def exit_code_for(status: str, driver_exit_code: int | None) -> int:
    """The process exit code that mirrors a finished job."""
    if status == "FAILED" and driver_exit_code == 2:
        return 2
    return EXIT_CODES.get(status, 1)


class JobsClient:
    """The Jobs API of one cluster, authenticated with the token kiln found (if any)."""

    def __init__(self, address: str, token: AuthToken | None = None) -> None:
        self.address = address.rstrip("/")
        self.token = token if token is not None else find_token()
        self._preflight()
        from ray.job_submission import JobSubmissionClient

        headers = self.token.headers() if self.token else None
        self._client = JobSubmissionClient(self.address, headers=headers)

    def _preflight(self) -> None:
        """One plain request first, so that auth and reachability fail with kiln's words."""
        import requests

        headers = self.token.headers() if self.token else {}
        try:
            answer = requests.get(f"{self.address}/api/jobs/", headers=headers, timeout=15)
        except requests.RequestException as exc:
            raise KilnError(
                f"--address {self.address}: no Ray Jobs API answers there ({type(exc).__name__}); "
                "is the cluster up? (cluster/local.sh status)"
            ) from None
        if answer.status_code == 401:
            raise KilnError(
                f"--address {self.address}: the cluster requires an auth token (HTTP 401) and none "
                "was found: export RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH=<token file> "
                f"(cluster/local.sh writes {local_cluster_dir() / 'auth_token'})"
            )
        if answer.status_code == 403:
            source = self.token.source if self.token else "the request"
            raise KilnError(
                f"--address {self.address}: the cluster rejected the auth token from {source} "
                "(HTTP 403); use the token the cluster was started with"
            )
        if answer.status_code >= 400:
            raise KilnError(
                f"--address {self.address}: the Jobs API answered HTTP {answer.status_code}: "
                f"{answer.text[:200]}"
            )

    def submit(
        self,
        entrypoint: str,
        runtime_env: dict[str, Any],
        *,
        submission_id: str,
        metadata: dict[str, str],
    ) -> str:
        """Submit a job; returns its submission id."""
        try:
            return str(
                self._client.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=runtime_env,
                    submission_id=submission_id,
                    metadata=metadata,
                )
            )
        except (RuntimeError, ValueError) as exc:
            raise KilnError(f"submitting to {self.address} failed: {exc}") from None

    def info(self, job_id: str) -> Any:
        """Ray's JobInfo/JobDetails for `job_id`."""
        try:
            return self._client.get_job_info(job_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                raise KilnError(f"no job {job_id!r} on {self.address} (kiln jobs list)") from None
            raise

    def list(self) -> list[Any]:
        """Every submitted job the cluster knows, oldest first (interactive drivers, such as a
        `ray.init` session, are not jobs to follow or stop and are left out)."""
        jobs = [job for job in self._client.list_jobs() if job.submission_id]
        return sorted(jobs, key=lambda job: job.start_time or 0)

    def latest(self) -> str:
        """The submission id of the most recently started job."""
        jobs = self.list()
        if not jobs:
            raise KilnError(f"no jobs on {self.address}")
        return str(jobs[-1].submission_id)

    def logs(self, job_id: str) -> str:
        self.info(job_id)
        return str(self._client.get_job_logs(job_id))

    def stop(self, job_id: str, wait_s: float = 60.0) -> str:
        """Ask the job to stop and wait until it is terminal; returns the final status."""
        info = self.info(job_id)
        if status_of(info) in TERMINAL:
            return status_of(info)
        self._client.stop_job(job_id)
        return self.wait(job_id, timeout_s=wait_s)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
        """Poll until the job is terminal or `timeout_s` passes; returns the last status."""
        deadline = time.monotonic() + timeout_s
        status = status_of(self.info(job_id))
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll_s)
            status = status_of(self.info(job_id))
        return status

    def follow(self, job_id: str, out: TextIO = sys.stdout) -> Any:
        """Stream the job's log to `out` until it ends; returns its final JobInfo."""

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        self.info(job_id)
        asyncio.run(tail())
        # The stream closes when the driver exits; the status lands a moment later.
        self.wait(job_id, timeout_s=30)
        return self.info(job_id)
