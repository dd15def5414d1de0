"""Rolling bin counts: one count vector per time bucket, kept for a bounded retention.

Memory is at most `retention_s / bucket_s + 1` vectors of `Binner.size` int64 per model version
(a digits model, 64 features of about 13 bins, kept a day in minute buckets: about 9.6 MB), no
matter how much traffic arrives; no raw input is ever kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np


class RollingCounts:
    """Time-bucketed count vectors of one model version.

    Args:
        size: length of a count vector (`Binner.size`).
        bucket_s: seconds per bucket.
        retention_s: buckets older than this are dropped.
        clock: seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        size: int,
        *,
        bucket_s: float = 60.0,
        retention_s: float = 86_400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.size = size
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self.clock = clock
        self._buckets: dict[int, np.ndarray] = {}

    @property
    def max_buckets(self) -> int:
        """The most buckets ever held."""
        return math.ceil(self.retention_s / self.bucket_s) + 1

    def bucket_of(self, when: float) -> int:
        """The bucket index of a timestamp."""
        return int(when // self.bucket_s)

    def add(self, counts: np.ndarray, when: float | None = None) -> None:
        """Add one count vector at time `when` (default now); too-old counts are ignored."""
        now = self.clock()
        bucket = self.bucket_of(now if when is None else when)
        if bucket < self._oldest(now):
            return
        held = self._buckets.get(bucket)
        if held is None:
            held = self._buckets[bucket] = np.zeros(self.size, dtype=np.int64)
        held += np.asarray(counts, dtype=np.int64)
        self._expire(now)

    def total(self, window_s: float) -> np.ndarray:
        """Counts of the buckets that overlap the last `window_s` seconds."""
        now = self.clock()
        self._expire(now)
        first = self.bucket_of(now - window_s)
        out = np.zeros(self.size, dtype=np.int64)
        for bucket, counts in self._buckets.items():
            if bucket >= first:
                out += counts
        return out

    def __len__(self) -> int:
        return len(self._buckets)

    def _oldest(self, now: float) -> int:
        return self.bucket_of(now - self.retention_s)

    def _expire(self, now: float) -> None:
        oldest = self._oldest(now)
        for bucket in [b for b in self._buckets if b < oldest]:
            del self._buckets[bucket]
