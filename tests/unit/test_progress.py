"""The progress display: a live line on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln import progress as progress_module
from kiln.progress import (
    Progress,
    eta_seconds,
    format_duration,
    format_rate,
    progress_interval,
    progress_mode,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class FakeTerminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows: a carriage return or `ESC[K` rewrites the current line."""
    lines = [""]
    for part in raw.replace("\x1b[K", "").split("\n"):
        lines[-1] = part.rsplit("\r", 1)[-1]
        lines.append("")
    return [line for line in lines if line]


def plain(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kiln.progress"]


def test_mode_follows_the_stream_and_the_switch() -> None:
    assert progress_mode(FakeTerminal(), {"TERM": "xterm"}) == "tty"
    assert progress_mode(io.StringIO(), {}) == "plain"
    assert progress_mode(FakeTerminal(), {"TERM": "dumb"}) == "plain"
    assert progress_mode(FakeTerminal(), {"KILN_PROGRESS": "plain"}) == "plain"
    for off in ("0", "off", "False", "no"):
        assert progress_mode(FakeTerminal(), {"KILN_PROGRESS": off}) == "off"


def test_interval_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    assert progress_interval({}) == 10.0
    assert progress_interval({"KILN_PROGRESS_INTERVAL": "2.5"}) == 2.5
    assert progress_interval({"KILN_PROGRESS_INTERVAL": "soon"}) == 10.0
    assert "KILN_PROGRESS_INTERVAL='soon'" in caplog.text


def test_formats_and_eta_arithmetic() -> None:
    assert format_duration(7.4) == "0:07"
    assert format_duration(754) == "12:34"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(None) == "?"
    assert format_rate(12345.6) == "12,346"
    assert format_rate(42.51) == "42.5"
    assert format_rate(0.314) == "0.31"
    assert eta_seconds(250, 1000, 50.0) == 15.0
    assert eta_seconds(1000, 1000, 50.0) == 0.0
    assert eta_seconds(10, None, 5.0) is None
    assert eta_seconds(0, 100, None) is None


def test_plain_lines_every_interval_then_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln.progress")
    clock = FakeClock()
    progress = Progress("scoring", total=1000, mode="plain", interval=10, clock=clock)
    for _ in range(40):  # 40 updates over 20 s: a line at 10 s and at 20 s, no more
        clock.tick(0.5)
        progress.advance(20)
    assert plain(caplog) == [
        "scoring: 400/1,000 rows (40%), 40.0 rows/s, ETA 0:15, elapsed 0:10",
        "scoring: 800/1,000 rows (80%), 40.0 rows/s, ETA 0:05, elapsed 0:20",
    ]
    clock.tick(5)
    progress.update(1000)
    progress.close()
    assert plain(caplog)[-1] == "scoring: done, 1,000/1,000 rows in 0:25 (40.0 rows/s)"
    assert len(plain(caplog)) == 3


def test_rate_follows_the_recent_window() -> None:
    clock = FakeClock()
    progress = Progress("x", total=10_000, mode="plain", interval=1e9, clock=clock)
    for _ in range(60):  # slow start: 1 row/s for a minute
        clock.tick(1)
        progress.advance(1)
    for _ in range(60):  # then 100 rows/s
        clock.tick(1)
        progress.advance(100)
    rate = progress.rate()
    assert rate is not None and 95 <= rate <= 100  # not the whole-run average of about 50
    assert "ETA 0:3" in progress.status()  # (10,000 - 6,060) / ~100 rows/s: about 40 s


def test_unknown_total_shows_count_and_rate_without_eta() -> None:
    clock = FakeClock()
    progress = Progress("writing", mode="plain", interval=1e9, clock=clock, unit="files")
    clock.tick(4)
    progress.advance(2)
    assert progress.status() == "2 files, 0.50 files/s, elapsed 0:04"


def test_tty_line_redraws_in_place_throttled_and_ends_with_the_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kiln.progress")
    clock, terminal = FakeClock(), FakeTerminal()
    progress = Progress("scoring", total=100, stream=terminal, clock=clock, width=100)
    assert progress.mode == "tty"
    for _ in range(100):  # 100 updates in 1 s: at most one redraw per 0.15 s
        clock.tick(0.01)
        progress.advance(1)
    draws = terminal.getvalue().count("\r")
    assert 5 <= draws <= 7
    assert "\n" not in terminal.getvalue()
    shown = screen(terminal.getvalue())
    assert len(shown) == 1
    assert shown[0].startswith("[kiln] scoring [")
    assert "/100 rows" in shown[0] and "rows/s" in shown[0] and "ETA 0:0" in shown[0]
    assert "\u2588" in shown[0] and "\u2591" in shown[0]
    progress.close()
    assert screen(terminal.getvalue()) == []  # the live line is wiped
    assert plain(caplog) == ["scoring: done, 100/100 rows in 0:01 (100 rows/s)"]


def test_tty_line_fits_the_terminal_width() -> None:
    progress = Progress("scoring", total=10**9, stream=FakeTerminal(), width=40)
    progress.update(123_456_789)
    assert len(progress.line()) == 39
    progress.close()


def test_log_lines_do_not_break_the_live_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("[kiln] %(message)s"))
    log = logging.getLogger("kiln.test_progress_guard")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    clock = FakeClock()
    try:
        progress = Progress("scoring", total=10, stream=terminal, clock=clock, width=100)
        progress.start()
        clock.tick(1)
        progress.update(5)
        log.info("a log line while scoring")
        print("(ScoringActor pid=1) a forwarded worker line", file=sys.stderr)
        shown = screen(terminal.getvalue())
        assert shown[0] == "[kiln] a log line while scoring"
        assert shown[1] == "(ScoringActor pid=1) a forwarded worker line"
        assert shown[2].startswith("[kiln] scoring [") and "5/10 rows" in shown[2]
        progress.close()
        assert sys.stderr is terminal and handler.stream is terminal  # streams restored
        log.info("after")
        assert screen(terminal.getvalue())[-1] == "[kiln] after"
    finally:
        log.removeHandler(handler)


def test_off_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln.progress")
    terminal = FakeTerminal()
    clock = FakeClock()
    with Progress("scoring", total=10, mode="off", stream=terminal, clock=clock) as progress:
        clock.tick(100)
        progress.update(10)
    assert terminal.getvalue() == "" and plain(caplog) == []


def test_failure_summary_says_where_it_stopped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln.progress")
    clock = FakeClock()
    progress = Progress("scoring", total=10, mode="plain", interval=1e9, clock=clock)
    with pytest.raises(RuntimeError), progress:
        clock.tick(2)
        progress.update(4)
        raise RuntimeError("boom")
    assert plain(caplog) == ["scoring: stopped after 4/10 rows in 0:02 (2.00 rows/s)"]


def test_ticker_polls_a_counter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln.progress")
    counter = {"rows": 0}
    polled = threading.Event()

    def poll() -> int:
        counter["rows"] += 10
        polled.set()
        return counter["rows"]

    with Progress("scoring", total=1000, mode="plain", interval=0.05, poll=poll, poll_s=0.01):
        assert polled.wait(5)
        time.sleep(0.3)
    lines = plain(caplog)
    assert len(lines) >= 2 and lines[0].startswith("scoring: ") and "/1,000 rows" in lines[0]
    assert lines[-1].startswith(f"scoring: done, {counter['rows']:,}/1,000 rows in ")


def test_a_second_live_line_falls_back_to_plain_lines() -> None:
    terminal = FakeTerminal()
    outer = Progress("tuning", total=4, unit="trials", stream=terminal).start()
    inner = Progress("scoring", total=10, stream=terminal).start()
    assert (outer.mode, inner.mode) == ("tty", "plain")
    inner.close()
    outer.close()
    assert progress_module._active is None


def test_slow_work_is_counted_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln.progress")
    clock = FakeClock()
    progress = Progress("tuning", total=4, unit="trials", mode="plain", interval=60, clock=clock)
    clock.tick(60)
    progress.update(1)  # one trial a minute: 3 left, 3 minutes
    clock.tick(60)
    progress.update(2)
    progress.close()
    assert plain(caplog) == [
        "tuning: 1/4 trials (25%), 1.00 trials/min, ETA 3:00, elapsed 1:00",
        "tuning: 2/4 trials (50%), 1.00 trials/min, ETA 2:00, elapsed 2:00",
        "tuning: done, 2/4 trials in 2:00 (1.00 trials/min)",
    ]


def test_sweep_progress_counts_finished_trials_of_the_total(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from kiln.tune.progress import LiveTable

    caplog.set_level(logging.INFO, logger="kiln.progress")
    monkeypatch.setenv("KILN_PROGRESS", "plain")
    trials = [
        SimpleNamespace(trial_id=f"t{i}", config={"train.lr": 0.1 * i}, status="PENDING")
        for i in range(4)
    ]
    trials[0].status = "TERMINATED"  # finished before the sweep was resumed
    table = LiveTable(["train.lr"], "val_loss", "min")
    table.setup(total_num_samples=4)
    assert table._progress is not None and table._progress.total == 4
    for trial in trials[1:3]:
        table.on_trial_start(0, trials, trial)
        table.on_trial_result(0, trials, trial, {"epoch": 1, "val_loss": 0.5})
        table.on_trial_complete(0, trials, trial)
    table.on_trial_error(0, trials, trials[3])
    assert table._progress.done == 4
    table.on_experiment_end(trials)
    assert plain(caplog)[-1].startswith("tuning: done, 4/4 trials in 0:00 (")


def test_data_synth_reports_rows_written(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import itertools
    from functools import partial

    from kiln.data import examples
    from kiln.data.examples import write_synth

    caplog.set_level(logging.INFO, logger="kiln.progress")
    # A clock one second further at every reading: a line after every row group, however fast.
    clock = itertools.count()
    monkeypatch.setattr(examples, "Progress", partial(examples.Progress, clock=lambda: next(clock)))
    monkeypatch.setenv("KILN_PROGRESS_INTERVAL", "0.5")
    write_synth(tmp_path / "synth", rows=5000, features=3, shards=2, rows_per_group=1000)
    lines = plain(caplog)
    assert any(line.startswith("writing synth: 1,000/5,000 rows (20%), ") for line in lines)
    assert lines[-1].startswith("writing synth: done, 5,000/5,000 rows in ")
