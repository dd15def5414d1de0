"""Live drift in serving: replicas count inputs, one store per application merges and scores.

Every ingress replica (the model may run inside it or in its own deployment; the inputs pass
through the ingress either way) queues each validated request's rows and counts them into the
model version's profile bins in batches (`DriftRecorder.schedule`: a worker thread, off the
request path, once 4,096 rows are queued or at each flush), and sends the summed counts to the
application's `DriftStore` every `flush_interval_s`. The store is one named,
detached Ray actor per Serve application (`kiln-drift-<app>` in namespace `kiln`): it keeps
time-bucketed counts per model version (`RollingCounts`, bounded by the retention), exports the
per-feature PSI/KS gauges over the configured window, and answers drift queries for any window
within the retention. It outlives replica restarts and redeploys (a version served again keeps
its history: entries are keyed by model, version and profile) and exits when its application
is gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.monitor.drift import Thresholds, drift_report
from kiln.monitor.profile import Binner, Profile
from kiln.monitor.spec import MonitorSpec
from kiln.monitor.window import RollingCounts

logger = logging.getLogger(__name__)

NAMESPACE = "kiln"
_WATCH_S = 30.0
"""How often the store checks that its Serve application still exists."""
_GAUGE_EVERY_S = 1.0
_COUNT_ROWS = 4096
"""Live rows a replica holds before counting them (in one worker-thread call per model version
and time bucket); otherwise they are counted at the next flush."""


def store_name(app: str) -> str:
    """The named actor of an application's drift store."""
    return f"kiln-drift-{app}"


def entry_key(model: str, version: str, profile: dict[str, Any]) -> str:
    """A model version's key in the store (the profile's digest, so a different model served
    under the same name and version never shares counts)."""
    digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:12]
    return f"{model}:{version}:{digest}"


@dataclass
class _Entry:
    model: str
    version: str
    ref: str
    profile: Profile
    binner: Binner
    thresholds: Thresholds
    counts: RollingCounts


class DriftStore:
    """The application's drift store (a Ray actor; see the module docstring).

    Args:
        app: the Serve application's name (the store exits once it is gone).
        bucket_s, retention_s: rolling window buckets.
        gauge_window_s: window of the exported gauges.
    """

    def __init__(
        self, app: str, bucket_s: float, retention_s: float, gauge_window_s: float
    ) -> None:
        from kiln import metrics

        self.app = app
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self.gauge_window_s = gauge_window_s
        self.entries: dict[str, _Entry] = {}
        self._psi = metrics.create("kiln_feature_drift_psi")
        self._ks = metrics.create("kiln_feature_drift_ks")
        self._samples = metrics.create("kiln_drift_samples")
        self._dirty: set[str] = set()
        self._gauging: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def register(
        self, key: str, model: str, version: str, ref: str, profile: dict, thresholds: dict
    ) -> None:
        """Know a model version (idempotent; new thresholds replace the old ones)."""
        self._watch()
        entry = self.entries.get(key)
        if entry is not None:
            entry.thresholds = Thresholds.from_dict(thresholds)
            return
        parsed = Profile.from_dict(profile)
        binner = Binner(parsed)
        self.entries[key] = _Entry(
            model,
            version,
            ref,
            parsed,
            binner,
            Thresholds.from_dict(thresholds),
            RollingCounts(binner.size, bucket_s=self.bucket_s, retention_s=self.retention_s),
        )

    async def add(self, items: list[tuple[str, float, list[int]]]) -> list[str]:
        """Add count vectors `(key, time, counts)`; returns the keys it does not know (the
        replica registers those and sends them again)."""
        unknown = []
        for key, when, counts in items:
            entry = self.entries.get(key)
            if entry is None:
                unknown.append(key)
                continue
            entry.counts.add(np.asarray(counts, dtype=np.int64), when)
            self._dirty.add(key)
        if self._dirty and (self._gauging is None or self._gauging.done()):
            self._gauging = asyncio.get_running_loop().create_task(self._gauges_soon())
        return unknown

    async def drift(self, keys: list[str], window_s: float) -> list[dict[str, Any]]:
        """Drift reports of the given versions over the last `window_s` seconds."""
        reports = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                reports.append({"key": key, "known": False})
                continue
            report = drift_report(entry.profile, entry.counts.total(window_s), entry.thresholds)
            reports.append(
                {
                    "key": key,
                    "known": True,
                    "version": entry.version,
                    "ref": entry.ref,
                    "window_s": window_s,
                    "thresholds": entry.thresholds.to_dict(),
                    **report,
                }
            )
        return reports

    async def buckets(self) -> dict[str, int]:
        """Buckets held per key (bounded by retention / bucket)."""
        return {key: len(entry.counts) for key, entry in self.entries.items()}

    async def _gauges_soon(self) -> None:
        """Update the gauges of the versions with new counts, at most once a second."""
        await asyncio.sleep(_GAUGE_EVERY_S)
        self._update_gauges()

    def _update_gauges(self) -> None:
        for key in list(self._dirty):
            entry = self.entries[key]
            report = drift_report(
                entry.profile, entry.counts.total(self.gauge_window_s), entry.thresholds
            )
            tags = {"model": entry.model, "version": entry.version}
            self._samples.set(report["samples"], tags=tags)
            for feature in report["features"]:
                feature_tags = {**tags, "feature": feature["name"]}
                self._psi.set(feature["psi"], tags=feature_tags)
                if feature["ks"] is not None:
                    self._ks.set(feature["ks"], tags=feature_tags)
        self._dirty.clear()

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_app())

    async def _watch_app(self) -> None:
        """Refresh every gauge now and then; exit once the Serve application is gone (the
        actor is detached)."""
        import ray
        from ray import serve

        while True:
            await asyncio.sleep(_WATCH_S)
            self._dirty.update(self.entries)  # old buckets leave the gauges' window too
            self._update_gauges()
            try:
                status = await asyncio.to_thread(serve.status)
                gone = self.app not in status.applications
            except Exception:  # Serve itself is shut down
                gone = True
            if gone:
                logger.info("drift store %s: the application is gone; exiting", self.app)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def open_store(app: str, settings: MonitorSpec) -> Any:
    """The application's store actor, created on first use."""
    import ray

    actor: Any = ray.remote(DriftStore)
    return actor.options(
        name=store_name(app),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
    ).remote(app, settings.bucket_s, settings.retention_s, settings.window_s)


@dataclass
class _Monitored:
    key: str
    model: str
    version: str
    ref: str
    profile: dict[str, Any]
    binner: Binner
    thresholds: Thresholds


class DriftRecorder:
    """The ingress side: counts live inputs per model version and flushes them to the store.

    Args:
        app: the Serve application's name.
        settings: the application's `monitor` settings.
        versions: per served version `{"model", "version", "ref", "profile", "thresholds"}`
            (profile as stored in the registry, thresholds as `Thresholds.to_dict`).
    """

    def __init__(self, app: str, settings: MonitorSpec, versions: list[dict[str, Any]]) -> None:
        self.app = app
        self.settings = settings
        self.monitored: dict[tuple[str, str], _Monitored] = {}
        for item in versions:
            profile = item["profile"]
            self.monitored[(item["model"], item["version"])] = _Monitored(
                entry_key(item["model"], item["version"], profile),
                item["model"],
                item["version"],
                item["ref"],
                profile,
                Binner(Profile.from_dict(profile)),
                Thresholds.from_dict(item["thresholds"]),
            )
        self._pending: dict[tuple[str, float], np.ndarray] = {}
        self._lock = threading.Lock()
        self._store: Any = None
        self._flusher: asyncio.Task[None] | None = None
        self._counting: set[asyncio.Future[None]] = set()
        self._queued: dict[tuple[str, str, float], list[pa.Table]] = {}
        self._queued_rows = 0

    def watches(self, model: str, version: str) -> bool:
        """Whether a version's inputs are counted."""
        return (model, version) in self.monitored

    def record(
        self, model: str, version: str, table: pa.Table, bucket: float | None = None
    ) -> None:
        """Count rows (never kept) into a time bucket (default: now's); thread-safe."""
        item = self.monitored.get((model, version))
        if item is None:
            return
        try:
            counts = item.binner.count(table)
        except Exception:  # a column the model accepted but the profile cannot bin
            logger.warning("drift: cannot count inputs of %s", item.ref, exc_info=True)
            return
        if bucket is None:
            bucket = (time.time() // self.settings.bucket_s) * self.settings.bucket_s
        with self._lock:
            held = self._pending.get((item.key, bucket))
            if held is None:
                self._pending[(item.key, bucket)] = counts
            else:
                held += counts

    def schedule(self, model: str, version: str, table: pa.Table) -> None:
        """Queue one request's rows for counting (off the request path) and keep the flusher
        running. Rows are counted together, in a worker thread, once `_COUNT_ROWS` are queued
        or at the next flush: one count per request cost more than the request itself (a
        64-feature row: ~0.1 ms of binning plus a thread hand-off, GIL included)."""
        if not self.watches(model, version):
            return
        bucket = (time.time() // self.settings.bucket_s) * self.settings.bucket_s
        self._queued.setdefault((model, version, bucket), []).append(table)
        self._queued_rows += table.num_rows
        if self._queued_rows >= _COUNT_ROWS and not self._counting:
            counting = asyncio.ensure_future(self._count_queued())
            self._counting.add(counting)
            counting.add_done_callback(self._counting.discard)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _count_queued(self) -> None:
        queued, self._queued, self._queued_rows = self._queued, {}, 0
        if queued:
            await asyncio.get_running_loop().run_in_executor(None, self._count_tables, queued)

    def _count_tables(self, queued: dict[tuple[str, str, float], list[pa.Table]]) -> None:
        for (model, version, bucket), tables in queued.items():
            try:
                merged = pa.concat_tables(tables, promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # requests decoded to other types
                for table in tables:
                    self.record(model, version, table, bucket)
                continue
            self.record(model, version, merged, bucket)

    async def flush(self) -> None:
        """Send the pending counts to the store (kept for the next try when it fails)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        items = [(key, when, counts.tolist()) for (key, when), counts in pending.items()]
        try:
            store = await self._open()
            unknown = set(await store.add.remote(items))
            if unknown:  # the store restarted: tell it the versions again
                await self._register(store, unknown)
                await store.add.remote([i for i in items if i[0] in unknown])
        except Exception:
            logger.warning("drift: could not reach the drift store; retrying", exc_info=True)
            self._store = None
            oldest = time.time() - self.settings.retention_s  # bounded while the store is away
            with self._lock:
                for (key, when), counts in pending.items():
                    if when < oldest:
                        continue
                    held = self._pending.setdefault((key, when), np.zeros_like(counts))
                    held += counts

    async def query(self, model: str, versions: list[str], window_s: float) -> list[dict]:
        """Drift reports of `model`'s `versions` over the last `window_s` seconds (this
        replica's requests answered so far included)."""
        await asyncio.gather(*list(self._counting))
        await self._count_queued()
        await self.flush()
        store = await self._open()
        keys = [self.monitored[(model, v)].key for v in versions]
        reports: list[dict] = await store.drift.remote(keys, window_s)
        if any(not r["known"] for r in reports):
            await self._register(store, {r["key"] for r in reports if not r["known"]})
            reports = await store.drift.remote(keys, window_s)
        return reports

    async def _open(self) -> Any:
        if self._store is None:
            store = open_store(self.app, self.settings)
            await self._register(store, {m.key for m in self.monitored.values()})
            self._store = store
        return self._store

    async def _register(self, store: Any, keys: set[str]) -> None:
        calls = [
            store.register.remote(
                m.key, m.model, m.version, m.ref, m.profile, m.thresholds.to_dict()
            )
            for m in self.monitored.values()
            if m.key in keys
        ]
        await asyncio.gather(*calls)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval_s)
            await asyncio.gather(*list(self._counting))
            await self._count_queued()
            await self.flush()
