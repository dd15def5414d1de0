"""Running kiln on a Ray cluster through the Ray Jobs API: auth, packaging, submission."""

from kiln.jobs.auth import AuthToken, find_token
from kiln.jobs.client import JobsClient, exit_code_for
from kiln.jobs.package import KINDS, PACKAGE_MODES, JobPackage, build_package

__all__ = [
    "KINDS",
    "PACKAGE_MODES",
    "AuthToken",
    "JobPackage",
    "JobsClient",
    "build_package",
    "exit_code_for",
    "find_token",
]
