"""TensorBoard event files for a run's per-epoch scalars (tensorboardX: no TensorFlow, no
`tensorboard` package needed to write them), and a reader for checking what was written."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln import storage
from kiln.tracking.store import numeric_metrics

TENSORBOARD_DIR = "tensorboard"


def event_dir(run_dir: str) -> str:
    """`<run dir>/tensorboard`; a run directory on a remote URI gets a local
    `./.kiln/tensorboard/<run name>` instead (TensorBoard reads local folders)."""
    if storage.is_uri(run_dir) and not run_dir.startswith("file://"):
        name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        return os.path.abspath(os.path.join(".kiln", TENSORBOARD_DIR, name))
    return os.path.join(run_dir.removeprefix("file://"), TENSORBOARD_DIR)


class ScalarWriter:
    """Writes each epoch's numeric metrics as scalars, step = epoch, straight to the event file
    (tensorboardX's SummaryWriter queues events for a thread that a finishing Ray Train
    controller may not wait for; this writer has no queue), flushed after every epoch so
    TensorBoard shows a running job."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._writer: Any = None

    def write(self, metrics: Mapping[str, Any], step: int) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self._writer is None:
            os.makedirs(self.directory, exist_ok=True)
            prefix = os.path.join(self.directory, "events")
            self._writer = EventsWriter(prefix, filename_suffix=f".{os.getpid()}")
        now = time.time()
        for key, value in numeric_metrics(metrics).items():
            event = Event(wall_time=now, step=int(step), summary=scalar(key, value))
            self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "_writer": None}


def read_scalars(directory: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `directory`: tag -> [(step, value)] in file order.

    Reads the TFRecord framing directly (length, crc, payload, crc) and parses each payload as
    a TensorBoard `Event`.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((int(event.step), value.simple_value))
    return scalars
