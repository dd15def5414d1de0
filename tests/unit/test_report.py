"""`kiln.report.write_report`: every kind of run renders its figures into one self-contained
page, and missing pieces leave a note instead of a crash."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.report import build_report, write_report
from kiln.tracking.record import RunRecord
from tests.unit.report_records import (
    START,
    FakeStore,
    classification_evaluation,
    lm_record,
    register_model,
    regression_evaluation,
    score_record,
    sweep_records,
    train_record,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embedded_figures(page: Path) -> dict[str, bytes]:
    """The PNG bytes of every <img> of the page, by its data-figure name."""
    found = re.findall(
        r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*" data-figure="([^"]+)"',
        page.read_text(),
    )
    return {name: base64.b64decode(data) for data, name in found}


def check_page(page: Path, expected: list[str]) -> dict[str, bytes]:
    """The page embeds exactly the expected figures, each identical to its PNG beside it."""
    figures = embedded_figures(page)
    assert sorted(figures) == sorted(expected)
    files = page.with_name(f"{page.stem}_files")
    assert sorted(p.stem for p in files.glob("*.png")) == sorted(expected)
    for name, data in figures.items():
        assert data.startswith(PNG_MAGIC)
        assert data == (files / f"{name}.png").read_bytes()
        assert len(data) > 5_000  # a drawn chart, not an empty canvas
    html = page.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    return figures


def test_classifier_report(tmp_path: Path) -> None:
    ref = register_model(tmp_path / "registry", "digits-mlp", classification_evaluation())
    page, report = build_report(
        train_record(ref), tmp_path / "out" / "train.html", registry=str(tmp_path / "registry")
    )
    assert page == tmp_path / "out" / "train.html" and report.all_notes == []
    check_page(page, ["loss", "metrics", "confusion_matrix", "throughput"])
    html = page.read_text()
    for fact in ("train run digits-mlp", "FINISHED", "digits-mlp:1", "1 min 35 s"):
        assert fact in html
    assert "best val_accuracy" in html and "0.95 (epoch 3)" in html
    # the per-class table: ten classes and the macro average, from evaluation.json
    assert html.count("<tr><td>") >= 11 and "macro average" in html
    evaluation = classification_evaluation()
    first = evaluation["per_class"][0]
    assert f"<td>0</td><td>{first['precision']:.3f}</td><td>{first['recall']:.3f}</td>" in html
    assert '<div class="note">' not in html


def test_retrain_report_shows_the_gate(tmp_path: Path) -> None:
    ref = register_model(tmp_path / "registry", "digits-mlp", classification_evaluation())
    record = train_record(ref)
    record.kind = "retrain"
    record.tags |= {"kiln.retrain.from": "digits-mlp:1", "kiln.retrain.decision": "refused"}
    record.metrics |= {
        "holdout_old_val_accuracy": [(0, 0.9417)],
        "holdout_new_val_accuracy": [(0, 0.3306)],
    }
    page, _ = build_report(record, tmp_path / "r.html", registry=str(tmp_path / "registry"))
    html = page.read_text()
    assert "retrain run digits-mlp" in html and "retrain from digits-mlp:1" in html
    assert "refused" in html and "old 0.9417, new 0.3306" in html


def test_regression_report_has_residuals(tmp_path: Path) -> None:
    ref = register_model(tmp_path / "registry", "housing", regression_evaluation())
    record = train_record(ref, task="regression")
    page, report = build_report(record, tmp_path / "r.html", registry=str(tmp_path / "registry"))
    check_page(page, ["loss", "metrics", "residuals", "throughput"])
    assert report.all_notes == []
    html = page.read_text()
    assert "all 500 rows" in html
    assert f"<td>mse</td><td>{regression_evaluation()['mse']:.4g}</td>" in html


def test_language_model_report_has_perplexity_and_baseline(tmp_path: Path) -> None:
    page, report = build_report(lm_record(), tmp_path / "lm.html", registry=str(tmp_path))
    check_page(page, ["loss", "perplexity", "throughput"])
    assert report.all_notes == []  # no evaluation.json is expected for a language model
    html = page.read_text()
    assert "final val_perplexity" in html and "5.3" in html
    assert "unigram" in html and "mean tokens/s" in html


def test_sweep_report_plots_every_trial(tmp_path: Path) -> None:
    ref = register_model(tmp_path / "registry", "digits-mlp", classification_evaluation())
    parent, trials = sweep_records(ref)
    store = FakeStore({parent.run_id: trials})
    page, _ = build_report(
        parent, tmp_path / "sweep.html", store=store, registry=str(tmp_path / "registry")
    )
    check_page(page, ["trials", "params", "loss", "metrics", "confusion_matrix", "throughput"])
    html = page.read_text()
    assert "0.963 (trial_1)" in html and "3 of 4" in html  # best trial, finished trials
    assert "Training curves (best trial trial_1)" in html
    for trial in trials:  # the trial table: one row per trial with its searched values
        assert f"<td>{trial.tags['kiln.trial_id']}</td><td>{trial.status}</td>" in html
    assert "<th>model.hidden</th><th>train.lr</th>" in html


def test_score_report_counts_and_rate(tmp_path: Path) -> None:
    page = write_report(score_record(), tmp_path / "score.html", registry=str(tmp_path))
    check_page(page, ["rows"])
    html = page.read_text()
    for text in ("rows in", "360", "rows out", "356", "rows quarantined", "28.8 rows/s"):
        assert text in html


def test_missing_pieces_leave_notes(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    old = register_model(registry, "old-model", None)  # registered before evaluation.json
    _, report = build_report(train_record(old), tmp_path / "a.html", registry=str(registry))
    assert report.all_notes == [
        f"{old}: no evaluation.json (registered before evaluation artefacts)"
    ]
    assert "registered before evaluation artefacts" in (tmp_path / "a.html").read_text()

    _, report = build_report(train_record(None), tmp_path / "b.html", registry=str(registry))
    assert [f.name for f in report.figures] == ["loss", "metrics", "throughput"]
    assert report.all_notes == ["The run has no registered model (no kiln.model tag)."]

    _, report = build_report(train_record("gone:7"), tmp_path / "c.html", registry=str(registry))
    assert report.all_notes[0].startswith("Model gone:7 could not be read")

    parent, _ = sweep_records(None)
    _, report = build_report(parent, tmp_path / "d.html", registry=str(registry))
    assert "Trials not shown: the report was written without a tracking store." in report.all_notes

    empty = RunRecord("e" * 12, "train", "crashed", "FAILED", START)
    page, report = build_report(empty, tmp_path / "e.html", registry=str(registry))
    assert report.figures == []
    assert "No per-epoch loss was logged (train_loss, val_loss)." in report.all_notes
    assert "FAILED" in page.read_text() and "running" not in page.read_text()


def test_output_directory_and_stale_figures(tmp_path: Path) -> None:
    out = tmp_path / "report-dir"
    page = write_report(lm_record(), out, registry=str(tmp_path))
    assert page == out / "report.html" and (out / "report_files" / "perplexity.png").is_file()
    (out / "report_files" / "stale.png").write_bytes(b"old")
    write_report(score_record(), out, registry=str(tmp_path))
    assert sorted(p.name for p in (out / "report_files").iterdir()) == ["rows.png"]
    with pytest.raises(KilnError, match="name it \\*.html"):
        write_report(score_record(), tmp_path / "report.pdf")
