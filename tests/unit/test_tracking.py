"""Run tracking against a real MLflow sqlite store in a temp folder: what train/tune/score record,
how `kiln runs` finds it again, and that tracking never breaks or outlives a run."""

from __future__ import annotations

import json
import logging
import pickle
import re
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kiln.cli.main import main
from kiln.config import validate_spec
from kiln.config.spec import TrackingSpec
from kiln.errors import KilnError
from kiln.tracking import Tracker, default_uri, flatten, open_store
from kiln.tracking import jobs as tracked
from kiln.tracking.tensorboard import read_scalars


@pytest.fixture()
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store/mlflow.db"


def job_spec(tmp_path: Path, **tracking: Any) -> Any:
    return validate_spec(
        {
            "name": "digits-mlp",
            "data": {"train": "data/train", "validation_split": 0.2, "label": "label"},
            "train": {"epochs": 3, "deepspeed": {"zero_stage": 3}},
            "registry": str(tmp_path / "registry"),
            "tracking": tracking,
        }
    )


def log_epochs(tracker: Tracker, epochs: int) -> None:
    for epoch in range(1, epochs + 1):
        tracker.log_metrics({"epoch": epoch, "val_loss": 1.0 / epoch, "worker_nodes": ["a"]}, epoch)


def test_default_uri_is_an_absolute_sqlite_file_under_dot_kiln(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_uri() == f"sqlite:///{tmp_path}/.kiln/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_uri() == "http://tracking:5000"
    assert default_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_flatten_gives_dotted_keys_and_text_values() -> None:
    flat = flatten(
        {
            "train": {"lr": 0.001, "deepspeed": {"zero_stage": 2, "config": {}}},
            "model": {"hidden_sizes": [64, 32]},
            "tune": None,
            "name": "m",
        }
    )
    assert flat == {
        "train.lr": "0.001",
        "train.deepspeed.zero_stage": "2",
        "train.deepspeed.config": "{}",
        "model.hidden_sizes": "[64, 32]",
        "tune": "null",
        "name": "m",
    }


def test_train_run_round_trip(tmp_path: Path, uri: str) -> None:
    spec = job_spec(tmp_path, uri=uri, report=False)
    run_dir = str(tmp_path / "runs" / "digits-mlp-1")
    tracker = tracked.train_tracker(spec, run_dir, run_file="kiln_run.json")
    with tracker:
        log_epochs(tracker, 3)
        tracked.finish_training(
            tracker,
            spec,
            model=types.SimpleNamespace(ref="digits-mlp:4"),
            metrics={"epoch": 3, "val_loss": 1 / 3},
            history=[{"epoch": e, "val_loss": 1.0 / e} for e in (1, 2, 3)],
            run_dir=run_dir,
        )
    record = open_store(uri).get(tracker.run_id or "")
    assert record.kind == "train" and record.name == "digits-mlp"
    assert record.status == "FINISHED" and record.end_time is not None
    assert record.model == "digits-mlp:4"
    assert record.metrics["val_loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert record.metrics["best_val_loss"] == [(0, pytest.approx(1 / 3))]
    assert "epoch" not in record.metrics and "worker_nodes" not in record.metrics
    assert record.params["train.deepspeed.zero_stage"] == "3"
    assert record.params["data.validation_split"] == "0.2"
    assert record.tags["kiln.run_dir"] == run_dir and len(record.tags["kiln.spec_hash"]) == 64
    artifacts = tmp_path / "store" / "mlartifacts" / record.run_id / "artifacts"
    assert record.artifact_dir == str(artifacts)


def test_list_is_newest_first_and_filters(tmp_path: Path, uri: str) -> None:
    store = open_store(uri)
    ids = [
        store.create_run(experiment="e", kind=kind, name=name)
        for kind, name in [("train", "a"), ("score", "out/x"), ("train", "b")]
    ]
    assert [r.run_id for r in store.list()] == ids[::-1]
    assert [r.name for r in store.list(kind="train")] == ["b", "a"]
    assert [r.kind for r in store.list(name="out/x")] == ["score"]
    assert len(store.list(limit=2)) == 2
    assert [r.status for r in store.list()] == ["RUNNING"] * 3


def test_get_by_prefix_and_errors_name_the_id(uri: str) -> None:
    store = open_store(uri)
    ids = [store.create_run(experiment="e", kind="train", name=f"r{i}") for i in range(17)]
    assert store.get(ids[5][:10]).run_id == ids[5]
    assert store.get(ids[5].upper()).name == "r5"
    # 17 ids, 16 hex digits: two share a first character
    shared = next(c for c, n in Counter(i[0] for i in ids).items() if n > 1)
    with pytest.raises(KilnError, match=rf"run '{shared}': ambiguous, matches \d+ runs"):
        store.get(shared)
    unknown = "0" * 31 + "1" if not any(i.startswith("0" * 8) for i in ids) else "f" * 32
    with pytest.raises(KilnError, match=rf"run '{unknown}': no such run in sqlite:///"):
        store.get(unknown)
    with pytest.raises(KilnError, match=r"run 'digits': not a run id"):
        store.get("digits")


def test_sweep_children_and_resume_continue_the_same_runs(
    tmp_path: Path, uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = job_spec(tmp_path, uri=uri, report=False)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "kiln_sweep.json").write_text(json.dumps({"preprocessing": None}))
    parent = tracked.sweep_tracker(spec, str(sweep_dir), run_file="kiln_sweep.json")
    tracked.remember(parent, str(sweep_dir), "kiln_sweep.json")
    saved = json.loads((sweep_dir / "kiln_sweep.json").read_text())
    assert saved == {"preprocessing": None, "tracking_run_id": parent.run_id}
    (callback,) = tracked.trial_callbacks(parent, spec)
    trial = types.SimpleNamespace(trial_id="t_00000", config={"train.lr": 0.01})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(
        0, [], trial, {"epoch": 1, "val_accuracy": 0.8, "pid": 7, "trial_run_dir": "/r/t_00000"}
    )
    parent.fail(KeyboardInterrupt())  # the driver is stopped mid-sweep

    # `kiln tune --resume`: the same parent, and the restored callback finds the trial's run
    resumed = tracked.sweep_tracker(spec, str(sweep_dir), run_file="kiln_sweep.json")
    assert resumed.run_id == parent.run_id
    restored = pickle.loads(pickle.dumps(callback))
    restored.on_trial_result(0, [], trial, {"epoch": 2, "val_accuracy": 0.9})
    restored.on_trial_complete(0, [], trial)
    resumed.finish()

    store = open_store(uri)
    (child,) = store.children(resumed.run_id or "")
    assert child.kind == "trial" and child.parent_run_id == parent.run_id
    assert child.params == {"train.lr": "0.01"} and child.tags["kiln.run_dir"] == "/r/t_00000"
    assert child.metrics == {"val_accuracy": [(1, 0.8), (2, 0.9)]}
    assert child.status == "FINISHED"
    assert store.get(resumed.run_id or "").status == "FINISHED"

    assert main(["runs", "show", resumed.run_id or "", "--tracking-uri", uri]) == 0
    shown = capsys.readouterr().out
    assert re.search(
        r"trials \(1\):\n.*\n  \w{8}\s+t_00000\s+FINISHED\s+val_accuracy=0.9\s+2\s+"
        r"train.lr=0.01",
        shown,
    ), shown


def test_failed_and_interrupted_runs_are_recorded(tmp_path: Path, uri: str) -> None:
    spec = job_spec(tmp_path, uri=uri, report=False)
    with pytest.raises(RuntimeError), tracked.train_tracker(spec, "/r/1", run_file="x") as failed:
        failed.log_metrics({"val_loss": 0.9}, 1)
        raise RuntimeError("worker died")
    with pytest.raises(KeyboardInterrupt), tracked.train_tracker(spec, "/r/2", run_file="x") as ki:
        raise KeyboardInterrupt
    store = open_store(uri)
    first, second = store.get(failed.run_id or ""), store.get(ki.run_id or "")
    assert first.status == "FAILED" and first.tags["kiln.error"] == "RuntimeError: worker died"
    assert first.metrics == {"val_loss": [(1, 0.9)]}
    assert second.status == "KILLED"


def test_disabled_tracking_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = job_spec(tmp_path, enabled=False, tensorboard=True)
    with tracked.train_tracker(spec, str(tmp_path / "run"), run_file="kiln_run.json") as tracker:
        assert not tracker.enabled and tracked.train_callbacks(tracker, str(tmp_path)) == []
        log_epochs(tracker, 2)
        tracked.remember(tracker, str(tmp_path / "run"), "kiln_run.json")
        tracked.finish_training(
            tracker, spec, model=None, metrics={}, history=[], run_dir=str(tmp_path / "run")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_epoch_callback_logs_live_and_writes_tensorboard(tmp_path: Path, uri: str) -> None:
    spec = job_spec(tmp_path, uri=uri, tensorboard=True, report=False)
    run_dir = str(tmp_path / "run")
    tracker = tracked.train_tracker(spec, run_dir, run_file="kiln_run.json")
    (callback,) = tracked.train_callbacks(tracker, run_dir)
    callback = pickle.loads(pickle.dumps(callback))  # as Ray ships it to the Train controller
    for epoch in (1, 2):
        reports = [{"epoch": epoch, "train_loss": 2.0 / epoch, "val_accuracy": 0.4 * epoch}, {}]
        callback.after_report(None, reports, None)
    # not closed: a finished Ray Train controller just exits; every epoch is on disk already
    record = open_store(uri).get(tracker.run_id or "")
    assert record.metrics["train_loss"] == [(1, 2.0), (2, 1.0)]
    assert record.status == "RUNNING"
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["val_accuracy"] == [(1, pytest.approx(0.4)), (2, pytest.approx(0.8))]
    assert "epoch" not in scalars


def test_a_refused_write_warns_and_training_goes_on(
    tmp_path: Path, uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker.start(TrackingSpec(uri=uri), experiment="e", kind="train", name="n")
    assert tracker.store is not None
    tracker.store.client.delete_run(tracker.run_id)  # the store now refuses writes to it
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics({"val_loss": 1.0}, 1)
    assert "tracking: could not log metrics for run" in caplog.text


def test_bad_tracking_uri_is_a_user_error() -> None:
    with pytest.raises(KilnError, match=r"tracking store nope://x"):
        Tracker.start(TrackingSpec(uri="nope://x"), experiment="e", kind="train", name="n")


def test_end_of_run_report_is_logged_and_its_failure_only_warns(
    tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[Any, ...]] = []

    def write_report(record: Any, out: Any, *, store: Any = None, registry: Any = None) -> Path:
        calls.append((record.status, record.model, registry))
        Path(out).mkdir(parents=True)
        (Path(out) / "loss.png").write_bytes(b"png")
        (Path(out) / "report.html").write_text("<html></html>")
        return Path(out) / "report.html"

    fake = types.SimpleNamespace(write_report=write_report)
    monkeypatch.setitem(sys.modules, "kiln.report", fake)
    spec = job_spec(tmp_path, uri=uri)
    run_dir = str(tmp_path / "run")
    model = types.SimpleNamespace(ref="digits-mlp:1")
    with tracked.train_tracker(spec, run_dir, run_file="kiln_run.json") as tracker:
        tracked.finish_training(tracker, spec, model=model, metrics={}, history=[], run_dir=run_dir)
    assert calls == [("FINISHED", "digits-mlp:1", spec.registry)]
    assert (tmp_path / "run" / "report" / "report.html").is_file()
    record = open_store(uri).get(tracker.run_id or "")
    assert sorted(p.name for p in Path(record.artifact_dir or "").iterdir()) == [
        "loss.png",
        "report.html",
    ]

    def broken(*args: Any, **kwargs: Any) -> Path:
        raise ValueError("no figures")

    monkeypatch.setitem(sys.modules, "kiln.report", types.SimpleNamespace(write_report=broken))
    second = tracked.train_tracker(spec, run_dir + "2", run_file="x")
    with caplog.at_level(logging.WARNING), second:
        tracked.finish_training(second, spec, model=model, metrics={}, history=[], run_dir=run_dir)
    assert "report: not written (ValueError: no figures)" in caplog.text
    assert open_store(uri).get(second.run_id or "").status == "FINISHED"


def test_runs_cli_lists_and_shows(
    tmp_path: Path, uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = job_spec(tmp_path, uri=uri, report=False)
    with tracked.train_tracker(spec, "/r/1", run_file="x") as tracker:
        log_epochs(tracker, 2)
        tracked.finish_training(
            tracker,
            spec,
            model=types.SimpleNamespace(ref="digits-mlp:2"),
            metrics={"val_loss": 0.5},
            history=[],
            run_dir="/r/1",
        )
    score = tracked.score_tracker(
        TrackingSpec(uri=uri),
        ref="digits-mlp@production",
        output="out/s",
        params={"batch_size": 100},
    )
    summary = {
        "rows_in": 360,
        "rows_out": 358,
        "rows_quarantined": 2,
        "rows_per_s": 900.0,
        "model": "digits-mlp:2",
        "output": "out/s",
    }
    tracked.finish_score(score, summary)

    assert main(["runs", "list", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "id",
        "kind",
        "name",
        "status",
        "started",
        "duration",
        "metric",
        "model",
    ]
    assert lines[1].startswith(score.run_id[:8]) and "rows_per_s=900" in lines[1]
    assert "train  digits-mlp" in lines[2] and "best_val_loss=0.5" in lines[2]
    assert lines[2].split()[-1] == "digits-mlp:2"

    assert main(["runs", "list", "--kind", "score", "--json", "--tracking-uri", uri]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["last_metrics"]["rows_quarantined"] == 2 and listed["name"] == "out/s"

    assert main(["runs", "show", (tracker.run_id or "")[:8], "--tracking-uri", uri]) == 0
    shown = capsys.readouterr().out
    assert "FINISHED" in shown and "model: digits-mlp:2" in shown
    assert "per epoch:\n  epoch  val_loss\n  1      1\n  2      0.5" in shown
    assert "train.deepspeed.zero_stage: 3" in shown

    assert main(["runs", "show", "feed", "--tracking-uri", uri]) == 2
    assert "kiln: error: run 'feed': no such run" in capsys.readouterr().err


def test_report_latest_picks_the_newest_run_of_a_kind(
    tmp_path: Path, uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "latest", "--tracking-uri", uri, "-o", str(tmp_path / "r.html")]) == 2
    assert "no run in the tracking store" in capsys.readouterr().err
    store = open_store(uri)
    first = store.create_run(experiment="e", kind="train", name="first")
    store.log_metrics(first, {"train_loss": 1.0, "val_loss": 1.2}, step=1)
    store.create_run(experiment="e", kind="score", name="out/x")

    out = tmp_path / "r.html"
    assert main(["report", "latest", "--kind", "train", "--tracking-uri", uri, "-o", str(out)]) == 0
    assert "train run first" in out.read_text()
    assert main(["report", "latest", "--tracking-uri", uri, "-o", str(out)]) == 0
    assert "score run out/x" in out.read_text()
    capsys.readouterr()
    assert main(["report", first, "--kind", "train", "--tracking-uri", uri, "-o", str(out)]) == 2
    assert "--kind goes with RUN_ID `latest` only" in capsys.readouterr().err


def test_score_job_spec_carries_its_tracking_section(tmp_path: Path) -> None:
    from kiln.jobs.entry import score_argv

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: digits\ndata: {train: d, validation_split: 0.2, label: y}\n"
        "score: {input: in, output: out}\ntracking: {uri: 'sqlite:////t/m.db'}\n"
    )
    assert score_argv(str(spec))[-2:] == ["--tracking-uri", "sqlite:////t/m.db"]
    assert score_argv(str(spec), ["tracking.enabled=false"])[-1] == "--no-tracking"
    assert "--no-tracking" not in score_argv(str(spec), ["tracking.uri=null"])


def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path: Path, uri: str) -> None:
    store = open_store(uri)
    assert store.list() == []
    with pytest.raises(KilnError, match=r"run 'abc': no such run \(sqlite:///.* holds no runs"):
        store.get("abc")
    assert not (tmp_path / "store").exists()
