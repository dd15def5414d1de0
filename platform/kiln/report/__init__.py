"""End-of-run reports: one self-contained HTML page (images embedded) and its PNGs, built from a
tracked run (`RunRecord`), its trials and the registered model's evaluation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.report.content import Evaluation, Report, build
from kiln.report.html import render
from kiln.tracking.record import RunRecord

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY = "./.kiln/registry"
EVALUATION_DOCUMENT = "evaluation.json"
REPORT_PAGE = "report.html"

__all__ = ["build_report", "figures_dir", "write_report"]


def write_report(
    record: RunRecord, out: str | Path, *, store: Any = None, registry: str | None = None
) -> Path:
    """Write the report of `record` to `out` (.html) and its PNGs to `<stem>_files/` beside it.

    Args:
        out: the page (`*.html`), or a directory (an existing one, or a path without a suffix)
            to hold `report.html` and `report_files/`.
        store: the tracking store the record came from; asked for a sweep's trials
            (`store.children(run_id)`). Without one, a sweep's report notes the trials are missing.
        registry: registry root holding the run's model (`kiln.model` tag); default: the spec's
            `registry` parameter, else ./.kiln/registry.

    Returns:
        The path of the HTML page.
    """
    return build_report(record, out, store=store, registry=registry)[0]


def build_report(
    record: RunRecord, out: str | Path, *, store: Any = None, registry: str | None = None
) -> tuple[Path, Report]:
    """`write_report`, also returning what the page shows (figures, notes)."""
    page = Path(out)
    if page.is_dir() or not page.suffix:
        page = page / REPORT_PAGE
    if page.suffix.lower() not in (".html", ".htm"):
        raise KilnError(f"--output {page}: the report is an HTML page; name it *.html")
    files = figures_dir(page)
    if files.exists():
        shutil.rmtree(files)  # figures of an earlier report of this name must not linger
    files.mkdir(parents=True)
    children = _children(record, store)
    evaluation = _evaluation(record, registry)
    report = build(record, files, children=children, evaluation=evaluation)
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(render(report), encoding="utf-8")
    tmp.replace(page)
    for note in report.all_notes:
        logger.info("report note: %s", note)
    return page, report


def figures_dir(page: Path) -> Path:
    """Where the PNGs of the report at `page` go."""
    return page.with_name(f"{page.stem}_files")


def _children(record: RunRecord, store: Any) -> list[RunRecord] | None:
    if record.kind != "tune" or store is None:
        return None
    return list(store.children(record.run_id))


def _evaluation(record: RunRecord, registry: str | None) -> Evaluation:
    """The evaluation.json of the run's registered model, or why there is none."""
    ref = record.model
    if not ref:
        return Evaluation(None, missing="The run has no registered model (no kiln.model tag).")
    from kiln.registry import Registry

    root = registry or record.params.get("registry") or DEFAULT_REGISTRY
    try:
        reg = Registry(root)
        version = reg.resolve(ref)
    except KilnError as exc:
        return Evaluation(None, missing=f"Model {ref} could not be read from {root}: {exc}")
    try:
        return Evaluation(reg.read_document(version, EVALUATION_DOCUMENT), source=version.ref)
    except KilnError as exc:
        if "has no document" in str(exc):
            exc = KilnError(f"no {EVALUATION_DOCUMENT} (registered before evaluation artefacts)")
        return Evaluation(None, source=version.ref, missing=f"{version.ref}: {exc}")
