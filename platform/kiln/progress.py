"""Progress of long commands (score, train, tune, data synth) as a person expects to see it.

On a terminal: one line redrawn in place, a few times a second -- a bar when the total is
known, the count, the rate, the ETA and the time elapsed -- that log lines printed meanwhile
push up rather than break. Anywhere else (CI, `ray job submit` logs, a pipe): a plain log line
every `KILN_PROGRESS_INTERVAL` seconds (default 10). Either way one summary line at the end.

`KILN_PROGRESS=0` (or off/false/no) turns progress off; `KILN_PROGRESS=plain` prints plain lines
even on a terminal.

    with Progress("scoring", total=200_000, unit="rows") as progress:
        for batch in batches:
            ...
            progress.advance(len(batch))
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TextIO

logger = logging.getLogger(__name__)

ENV_SWITCH = "KILN_PROGRESS"
ENV_INTERVAL = "KILN_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
REDRAW_S = 0.15
"""Least time between two redraws of the live line (about 7 per second)."""
RATE_WINDOW_S = 30.0
"""The rate (and so the ETA) is measured over about this many recent seconds."""
PREFIX = "[kiln] "
_OFF = frozenset({"0", "off", "false", "no"})
_CLEAR = "\r\x1b[K"

Mode = Literal["tty", "plain", "off"]

_active_lock = threading.Lock()
_active: Progress | None = None  # the one live line drawn on the terminal now


def progress_mode(stream: Any = None, environ: Mapping[str, str] | None = None) -> Mode:
    """How progress shows on `stream` (default stderr): "tty" (a live line), "plain" (periodic
    log lines) or "off", from `KILN_PROGRESS` and whether the stream is a terminal."""
    environ = os.environ if environ is None else environ
    switch = environ.get(ENV_SWITCH, "").strip().lower()
    if switch in _OFF:
        return "off"
    if switch == "plain":
        return "plain"
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return "tty" if tty and environ.get("TERM", "") != "dumb" else "plain"


def progress_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between plain progress lines: `KILN_PROGRESS_INTERVAL`, default 10."""
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_INTERVAL, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        logger.warning(
            "%s=%r is not a positive number of seconds; using %g",
            ENV_INTERVAL,
            text,
            DEFAULT_INTERVAL_S,
        )
        return DEFAULT_INTERVAL_S
    return value


def format_duration(seconds: float | None) -> str:
    """`0:07`, `12:34`, `1:02:03`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(rate: float) -> str:
    """Rates with sensible precision: `12,345`, `42.5`, `0.31`."""
    if rate >= 100:
        return f"{rate:,.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


def eta_seconds(done: float, total: float | None, rate: float | None) -> float | None:
    """Seconds left at `rate` units/s; None without a total or a positive rate."""
    if total is None or rate is None or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


class Progress:
    """A progress display for one long operation. Thread-safe: `update`/`advance` may be called
    from any thread, and `start` runs a ticker thread (optionally polling a counter).

    Args:
        label: what is going on, e.g. "scoring".
        total: units expected, when known (a bar and an ETA then show).
        unit: what is counted, plural ("rows", "trials").
        mode: "tty", "plain" or "off"; default from `progress_mode(stream)`.
        interval: seconds between plain lines; default from `progress_interval()`.
        stream: where the live line is drawn (default stderr); plain lines go to logging.
        clock: a monotonic clock (tests pass a fake one).
        poll: a function returning the units done so far, called by the ticker thread.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "rows",
        mode: Mode | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll: Callable[[], int] | None = None,
        poll_s: float = 0.5,
        redraw_s: float = REDRAW_S,
        width: int | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self._stream: TextIO = stream if stream is not None else sys.stderr
        self.mode: Mode = mode or progress_mode(self._stream)
        self.interval = progress_interval() if interval is None else interval
        self._clock, self._poll, self._poll_s = clock, poll, poll_s
        self._redraw_s, self._width = redraw_s, width
        self.done = 0
        self._lock = threading.RLock()
        self._start = self._last_line = self._last_draw = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._start, 0)])
        self._drawn = False
        self._closed = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._guard: _Guard | None = None

    # -- feeding it -------------------------------------------------------------------------

    def update(self, done: int | None = None, *, total: int | None = None) -> None:
        """Set the units done so far (and the total, if it became known); shows when due."""
        with self._lock:
            if total is not None:
                self.total = total
            if done is not None:
                self.done = done
            self._tick()

    def advance(self, count: int = 1) -> None:
        """Add `count` units done."""
        with self._lock:
            self.done += count
            self._tick()

    def set_poll(self, poll: Callable[[], int]) -> None:
        """Have the ticker thread (see `start`) read the units done from `poll`."""
        self._poll = poll

    def start(self) -> Progress:
        """Take the terminal (log lines printed meanwhile then keep the live line intact) and
        run a ticker thread: polls `poll` (if given) and keeps the ETA and elapsed time fresh
        while nothing calls `update`. `with Progress(...)` calls it."""
        if self.mode == "tty" and self._guard is None:
            self._claim_terminal()
        if self.mode != "off" and self._ticker is None:
            self._ticker = threading.Thread(
                target=self._run_ticker, name="kiln-progress", daemon=True
            )
            self._ticker.start()
        return self

    def close(self, *, failed: bool = False) -> None:
        """Stop, remove the live line and log the summary line (once)."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=max(5.0, self._poll_s * 4))
        if self._poll is not None and not failed and self.mode != "off":
            self._safe_poll()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release_terminal()
            if self.mode != "off":
                logger.info("%s", self.summary(failed=failed))

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self.close(failed=kind is not None)

    # -- what it says -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return self._clock() - self._start

    def rate(self) -> float | None:
        """Units per second over the recent window (the whole run until the window fills)."""
        now = self._clock()
        since, then = self._samples[0]
        if now - since <= 0 or self.done <= then:
            return None if self.done == 0 else self.done / max(now - self._start, 1e-9)
        return (self.done - then) / (now - since)

    def status(self, *, elapsed: bool = True) -> str:
        """`6,000/10,000 rows (60%), 2,345 rows/s, ETA 0:02, elapsed 0:03` (the plain line,
        and the live line's text after its bar)."""
        parts = [self._count()]
        rate = self.rate()
        if rate is not None:
            parts.append(self._rate_text(rate))
        if self.total is not None:
            parts.append(f"ETA {format_duration(eta_seconds(self.done, self.total, rate))}")
        if elapsed:
            parts.append(f"elapsed {format_duration(self.elapsed())}")
        return ", ".join(parts)

    def summary(self, *, failed: bool = False) -> str:
        """The final line: `scoring: done, 10,000/10,000 rows in 0:04 (2,345 rows/s)`, or
        `stopped after` when `failed`."""
        elapsed = self.elapsed()
        rate = self.done / elapsed if elapsed > 0 else 0.0
        what = "stopped after" if failed else "done,"
        count = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
        return (
            f"{self.label}: {what} {count} {self.unit} in {format_duration(elapsed)} "
            f"({self._rate_text(rate)})"
        )

    def line(self) -> str:
        """The live line, fitted to the terminal width: a steady bar of 20 or 10 cells, then the
        elapsed time, then the bar give way before the line is cut."""
        width = self._width or shutil.get_terminal_size((100, 24)).columns
        head, full, short = f"{PREFIX}{self.label} ", self.status(), self.status(elapsed=False)
        candidates = [head + full, head + short]
        if self.total:
            bars = [(20, full), (10, full), (10, short)]
            candidates = [head + self._bar(cells) + text for cells, text in bars] + [head + short]
        fits = [text for text in candidates if len(text) < width]
        return fits[0] if fits else candidates[-1][: max(1, width - 1)]  # wrapped: no redraw

    def _bar(self, cells: int) -> str:
        assert self.total
        fraction = min(1.0, max(0.0, self.done / self.total))
        full, empty = self._bar_chars()
        filled = int(fraction * cells)
        return f"[{full * filled}{empty * (cells - filled)}] "

    # -- internals --------------------------------------------------------------------------

    def _rate_text(self, rate: float) -> str:
        """Per second, or per minute for slow work (trials): `2,345 rows/s`, `1.50 trials/min`."""
        if 0 < rate < 0.1:
            return f"{format_rate(rate * 60)} {self.unit}/min"
        return f"{format_rate(rate)} {self.unit}/s"

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done:,} {self.unit}"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done:,}/{self.total:,} {self.unit} ({percent:.0f}%)"

    def _bar_chars(self) -> tuple[str, str]:
        encoding = (getattr(self._stream, "encoding", None) or "").lower()
        return ("\u2588", "\u2591") if encoding.startswith("utf") else ("#", "-")

    def _tick(self) -> None:
        """Record a sample for the rate; draw or log if due. Caller holds the lock."""
        if self._closed or self.mode == "off":
            return
        now = self._clock()
        if self.done != self._samples[-1][1]:
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
        if self.mode == "tty":
            if now - self._last_draw >= self._redraw_s:
                self._draw()
        elif now - self._last_line >= self.interval:
            self._last_line = now
            logger.info("%s: %s", self.label, self.status())

    def _draw(self) -> None:
        self._last_draw = self._clock()
        self._stream.write(_CLEAR + self.line())
        self._stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        """Wipe the live line (before someone else writes to the terminal)."""
        if self._drawn:
            self._stream.write(_CLEAR)
            self._stream.flush()
            self._drawn = False

    def _redraw(self) -> None:
        if not self._closed:
            self._draw()

    def _claim_terminal(self) -> None:
        global _active
        with _active_lock:
            if _active is not None:  # one live line at a time; a nested one logs plain lines
                self.mode = "plain"
                return
            _active = self
        self._guard = _Guard(self)
        self._guard.install()

    def _release_terminal(self) -> None:
        global _active
        self._clear()
        if self._guard is None:
            return
        self._guard.uninstall()
        self._guard = None
        with _active_lock:
            _active = None

    def _run_ticker(self) -> None:
        period = self._redraw_s if self.mode == "tty" else min(1.0, self.interval)
        last_poll = -math.inf
        while not self._stop.wait(period):
            if self._poll is not None and self._clock() - last_poll >= self._poll_s:
                last_poll = self._clock()
                self._safe_poll()
            else:
                with self._lock:
                    self._tick()

    def _safe_poll(self) -> None:
        assert self._poll is not None
        try:
            done = self._poll()
        except Exception as exc:  # a progress count must never fail the job
            logger.debug("progress poll failed: %s", exc)
            return
        with self._lock:
            if done == 0:  # nothing done yet (start-up): the rate counts from the last such poll
                self._samples = deque([(self._clock(), 0)])
            self.update(max(done, self.done))  # a count only grows, whatever a late poll says


class _Guard:
    """While a live line is on the terminal, writes to stdout/stderr (prints, log handlers, Ray's
    forwarded worker logs) first wipe the line, which is redrawn after each complete line."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.swapped: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)

    def install(self) -> None:
        terminal = self.progress._stream
        originals = {id(terminal): terminal}
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is terminal or _same_terminal(stream, terminal):
                originals[id(stream)] = stream
                self._swap(sys, name, _GuardedStream(stream, self.progress))
        for handler in _stream_handlers():
            original = originals.get(id(handler.stream))
            if original is not None:
                self._swap(handler, "stream", _GuardedStream(original, self.progress))

    def uninstall(self) -> None:
        for owner, attribute, original in reversed(self.swapped):
            setattr(owner, attribute, original)
        self.swapped.clear()

    def _swap(self, owner: Any, attribute: str, replacement: Any) -> None:
        self.swapped.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, replacement)


class _GuardedStream:
    """A text stream that keeps a live progress line intact around what is written to it."""

    def __init__(self, stream: TextIO, progress: Progress) -> None:
        self._stream, self._progress = stream, progress

    def write(self, text: str) -> int:
        with self._progress._lock:
            self._progress._clear()
            written = self._stream.write(text)
            if text.endswith("\n"):
                self._stream.flush()
                self._progress._redraw()
            return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _same_terminal(a: Any, b: Any) -> bool:
    try:
        return bool(a.isatty() and b.isatty())
    except (AttributeError, ValueError):
        return False


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers: list[Any] = [logging.getLogger()]
    loggers += [
        item
        for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger)
    ]
    handlers = []
    for each in loggers:
        for handler in each.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handlers.append(handler)
    return handlers


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextmanager
def ray_data_bars_off() -> Iterator[None]:
    """Turn Ray Data's own progress bars (one per operator) off while kiln shows its line, and
    drop the warning Ray Data logs about them being off."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    quiet = logging.getLogger("ray.data._internal.progress")
    drop = _DropMessage("Progress bars disabled")
    quiet.addFilter(drop)
    try:
        yield
    finally:
        context.enable_progress_bars = before
        quiet.removeFilter(drop)
