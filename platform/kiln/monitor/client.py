"""Ask a running kiln server for a model's drift (`GET /v1/models/{name}/drift`), and show it."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kiln.errors import KilnError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


class MonitorError(KilnError):
    """Drift cannot be shown: server unreachable, unknown model, no profile, no traffic."""


def parse_window(text: str) -> float:
    """Seconds of a window such as `90s`, `15m`, `1h`, `2d` or a plain number of seconds.

    Raises:
        MonitorError: not a positive duration.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"] if match else 0.0
    if seconds <= 0:
        raise MonitorError(f"--window: {text!r} is not a duration such as 90s, 15m, 1h or 2d")
    return seconds


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name`, `name:version` or `name@alias` -> (name, version, alias)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, None, alias
    if ":" in ref:
        name, version = ref.split(":", 1)
        return name, version, None
    return ref, None, None


def fetch_drift(
    url: str,
    name: str,
    *,
    window: str,
    version: str | None = None,
    token: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The server's drift document for a served model.

    Raises:
        MonitorError: the server cannot be reached or answers an error (its message kept).
    """
    query = {"window": window, **({"version": version} if version else {})}
    path = f"/v1/models/{urllib.parse.quote(name, safe='')}/drift"
    request = urllib.request.Request(f"{url.rstrip('/')}{path}?{urllib.parse.urlencode(query)}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document
    except urllib.error.HTTPError as exc:
        raise MonitorError(f"{url}: {exc.code} {_error_text(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MonitorError(f"cannot reach the kiln server at {url} ({reason})") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode(errors="replace")
    try:
        document = json.loads(body)
    except ValueError:
        return body.strip()[:300] or str(exc.reason)
    error = document.get("error", body)
    return str(error.get("message", error) if isinstance(error, dict) else error)


def format_report(document: dict[str, Any], *, limit: int | None = None) -> str:
    """A table per served version: drifted features first, then the verdict line."""
    lines = []
    for report in document["versions"]:
        lines.append(
            f"{document['model']} version {report['version']} ({report['ref']}), last "
            f"{document['window']}: {report['samples']} live inputs"
        )
        lines.append(f"  {'':2}{'feature':<24} {'PSI':>8} {'KS':>8} {'samples':>9}  threshold")
        rows = report["features"] if limit is None else report["features"][:limit]
        for f in rows:
            mark = "!!" if f["over"] else ("  " if f["judged"] else " ?")
            ks = "-" if f["ks"] is None else f"{f['ks']:.4f}"
            limits = f"psi>{f['psi_threshold']:g}" + (
                f" ks>{f['ks_threshold']:g}" if f["ks_threshold"] is not None else ""
            )
            lines.append(
                f"  {mark}{f['name'][:24]:<24} {f['psi']:>8.4f} {ks:>8} {f['samples']:>9}  {limits}"
            )
        hidden = len(report["features"]) - len(rows)
        if hidden > 0:
            lines.append(f"  ... {hidden} more features under threshold (--all shows them)")
        lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
