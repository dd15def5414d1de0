"""What the benchmarks share: spotting another Ray on the same cores while a phase is timed.

Imported by benchmarks/train.py and benchmarks/lm.py (run as scripts, so this folder is on
sys.path).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator


def raylets() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "raylet/raylet"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


class Watch(threading.Thread):
    """Polls for raylets that are not this benchmark's (another user's Ray on the same cores)
    and tags each measured phase that overlapped one, so noisy figures are marked."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ours: set[int] = set()
        self.sightings: list[float] = []
        self.phases: dict[str, tuple[float, float]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(2.0):
            if raylets() - self.ours:
                self.sightings.append(time.monotonic())

    def stop(self) -> None:
        self._halt.set()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = (start, time.monotonic())

    def noisy(self) -> list[str]:
        return [
            name
            for name, (start, end) in self.phases.items()
            if any(start <= t <= end for t in self.sightings)
        ]
