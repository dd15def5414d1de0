"""`kiln submit` and `kiln jobs list|status|logs|stop`: kiln jobs on a Ray cluster's Jobs API."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from datetime import datetime
from typing import Any

from kiln.cli.train_cmd import OVERRIDES_HELP

_AUTH_HELP = (
    "The auth token is read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or the local "
    "cluster's .kiln/cluster/auth_token (cluster/local.sh)."
)


def add_commands(commands: Any) -> None:
    """Register `kiln submit` and `kiln jobs` on the top-level subparsers."""
    submit = commands.add_parser(
        "submit",
        help="run a job spec on a Ray cluster through the Ray Jobs API",
        description="Validate the spec, ship it with this project to the cluster and run "
        "`python jobs/<kind>.py SPEC` there. " + _AUTH_HELP,
    )
    submit.add_argument("spec", help="YAML job spec")
    submit.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    _address_flag(submit)
    submit.add_argument(
        "--kind",
        choices=["train", "tune", "score"],
        default="train",
        help="which entrypoint runs: jobs/train.py, jobs/tune.py or jobs/score.py (default: train)",
    )
    submit.add_argument(
        "--package",
        choices=["dir", "wheel", "none"],
        default="dir",
        help="how the code travels: dir uploads the project (without .venv, data, .kiln, out) "
        "and kiln; wheel ships kiln as a wheel (large projects); none uses the project already "
        "at the same path on the cluster (default: dir)",
    )
    submit.add_argument("--project", help="folder with jobs/<kind>.py (default: here or kiln's)")
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="job environment variable"
    )
    submit.add_argument("--job-id", help="submission id (default: kiln-<kind>-<name>-<time>)")
    submit.add_argument(
        "--follow",
        action="store_true",
        help="stream the log until the job ends, then exit 0 SUCCEEDED, 1 FAILED, 2 FAILED on "
        "a user error, 3 STOPPED",
    )
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser(
        "jobs", help="list, inspect, follow and stop jobs on a Ray cluster", description=_AUTH_HELP
    )
    actions = jobs.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every submitted job, oldest first")
    _address_flag(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)
    status = actions.add_parser("status", help="status, times and exit code of a job")
    status.add_argument("job_id", nargs="?", help="submission id (default: the latest job)")
    _address_flag(status)
    status.set_defaults(handler=_status)
    logs = actions.add_parser("logs", help="print a job's log")
    logs.add_argument("job_id", nargs="?", help="submission id (default: the latest job)")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    _address_flag(logs)
    logs.set_defaults(handler=_logs)
    stop = actions.add_parser("stop", help="stop a running job and wait until it has stopped")
    stop.add_argument("job_id", help="submission id")
    stop.add_argument("--wait", type=float, default=60.0, help="seconds to wait (default: 60)")
    _address_flag(stop)
    stop.set_defaults(handler=_stop)


def _address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the cluster's Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, the "
        "local cluster's, or http://127.0.0.1:8265)",
    )


def _client(args: argparse.Namespace) -> Any:
    from kiln.jobs.client import JobsClient, default_address

    return JobsClient(args.address or default_address())


def _submit(args: argparse.Namespace) -> int:
    from kiln.errors import KilnError
    from kiln.jobs import build_package

    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KilnError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    client = _client(args)
    package = build_package(
        args.spec,
        args.overrides,
        kind=args.kind,
        mode=args.package,
        project=args.project,
        env_vars=env_vars,
    )
    job_id = args.job_id or (
        f"kiln-{args.kind}-{package.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-"
        f"{secrets.token_hex(2)}"
    )
    try:
        client.submit(
            package.entrypoint,
            package.runtime_env,
            submission_id=job_id,
            metadata={"kiln_kind": args.kind, "kiln_name": package.spec.name},
        )
    finally:
        package.cleanup()
    for note in package.notes:
        print(f"kiln: {note}", file=sys.stderr)
    print(f"submitted {job_id}: {package.entrypoint}", file=sys.stderr)
    print(job_id)
    if not args.follow:
        print(f"follow it with: kiln jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    return _follow(client, job_id)


def _follow(client: Any, job_id: str) -> int:
    from kiln.jobs.client import exit_code_for, status_of

    try:
        info = client.follow(job_id)
    except KeyboardInterrupt:
        print(f"\nkiln: stopped following; {job_id} keeps running (kiln jobs stop {job_id})")
        return 130
    status = status_of(info)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" else ""))
    return exit_code_for(status, info.driver_exit_code)


def _list(args: argparse.Namespace) -> int:
    from kiln.jobs.client import status_of

    jobs = _client(args).list()
    rows = [
        {
            "job_id": job.submission_id,
            "status": status_of(job),
            "kind": (job.metadata or {}).get("kiln_kind", "-"),
            "started": _when(job.start_time),
            "ended": _when(job.end_time),
            "entrypoint": job.entrypoint,
        }
        for job in jobs
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no jobs")
        return 0
    for row in rows:
        print(f"{row['job_id']:48} {row['status']:10} {row['kind']:6} {row['started']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kiln.jobs.client import status_of

    client = _client(args)
    job_id = args.job_id or client.latest()
    info = client.info(job_id)
    print(f"job:        {job_id}")
    print(f"status:     {status_of(info)}")
    if info.message:
        print(f"message:    {info.message}")
    print(f"entrypoint: {info.entrypoint}")
    print(f"started:    {_when(info.start_time)}")
    print(f"ended:      {_when(info.end_time)}")
    if info.driver_exit_code is not None:
        print(f"exit code:  {info.driver_exit_code}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = _client(args)
    job_id = args.job_id or client.latest()
    if args.follow:
        return _follow(client, job_id)
    sys.stdout.write(client.logs(job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from kiln.jobs.client import TERMINAL

    status = _client(args).stop(args.job_id, wait_s=args.wait)
    print(f"job {args.job_id} {status}")
    return 0 if status in TERMINAL else 1


def _when(millis: int | None) -> str:
    if not millis:
        return "-"
    return datetime.fromtimestamp(millis / 1000).strftime("%Y-%m-%d %H:%M:%S")
