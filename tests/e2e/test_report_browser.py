"""`kiln report` as a user runs it, and the page as a person sees it: Debian's Chromium renders
the report headless; every figure must decode and show pixels where the layout puts it.

Skips when Chromium is missing, unless KILN_REQUIRE_BROWSER=1 (CI), where that fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.unit.report_records import classification_evaluation, register_model, sweep_records

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1200, 5200
KILN = str(Path(sys.executable).parent / "kiln")
# Set after load, from what the browser itself decoded and laid out (the report has no script).
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    const box = img.getBoundingClientRect();
    img.dataset.decoded = String(img.complete && img.naturalWidth > 0);
    img.dataset.natural = img.naturalWidth + "x" + img.naturalHeight;
    img.dataset.box = [box.left, box.top + window.scrollY, box.width, box.height]
      .map(Math.round).join(",");
  }
  document.body.dataset.probed = "yes";
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.environ.get("KILN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"KILN_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


def browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}", *args, page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.probed = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values)
        if tag == "body" and values.get("data-probed") == "yes":
            self.probed = True


def tracked_sweep(tmp_path: Path) -> tuple[str, str]:
    """A sweep and its trials in a real MLflow store, its model in a registry: (uri, run id)."""
    from kiln.tracking import open_store

    registry = tmp_path / "registry"
    ref = register_model(registry, "digits-mlp", classification_evaluation())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = open_store(uri)
    parent, trials = sweep_records(ref)
    params = {**parent.params, "registry": str(registry)}
    run_id = store.create_run(
        experiment="digits-mlp", kind="tune", name=parent.name, params=params, tags=parent.tags
    )
    for trial in trials:
        child = store.create_run(
            experiment="digits-mlp", kind="trial", name=trial.name, params=trial.params,
            tags=trial.tags, parent=run_id,
        )  # fmt: skip
        for name, points in trial.metrics.items():
            for step, value in points:
                store.log_metrics(child, {name: value}, step)
        store.end_run(child, trial.status)
    store.end_run(run_id, "FINISHED")
    return uri, run_id


def test_report_renders_in_chromium(tmp_path: Path, chromium: str) -> None:
    uri, run_id = tracked_sweep(tmp_path)
    page = tmp_path / "report.html"
    done = subprocess.run(
        [KILN, "report", run_id[:10], "--output", str(page), "--tracking-uri", uri],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(page)
    expected = ["trials", "params", "loss", "metrics", "confusion_matrix", "throughput"]
    assert [Path(line.split()[0]).stem for line in lines[1:]] == expected

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    dom = browse(chromium, probe, profile, "--dump-dom", "--virtual-time-budget=10000").stdout
    parser = Images()
    parser.feed(dom)
    assert parser.probed, "the page's load event never fired"
    assert [img["data-figure"] for img in parser.images] == expected
    for img in parser.images:
        assert img["data-decoded"] == "true", f"{img['data-figure']} did not decode"
        width, height = (int(v) for v in str(img["data-natural"]).split("x"))
        assert width >= 400 and height >= 300, img["data-natural"]

    shot = tmp_path / "report.png"
    browse(chromium, probe, profile, f"--screenshot={shot}", "--virtual-time-budget=10000")
    check_screenshot(shot, parser.images)
    if os.environ.get("KILN_REPORT_SCREENSHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["KILN_REPORT_SCREENSHOT"])


def check_screenshot(shot: Path, images: list[dict[str, str | None]]) -> None:
    """Where the layout put each figure the screenshot shows a drawn chart: many colours and a
    good share of non-white pixels, unlike the blank page around it."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    on_screen = 0
    for img in images:
        left, top, width, height = (int(v) for v in str(img["data-box"]).split(","))
        assert width > 300 and height > 200, (img["data-figure"], img["data-box"])
        if top + height > HEIGHT:
            continue  # below the fold of the fixed-size screenshot
        on_screen += 1
        region = pixels[top : top + height, left : left + width].reshape(-1, 3)
        inked = (region < 200).any(axis=1).mean()
        colours = len(np.unique(region // 16, axis=0))
        assert 0.01 < inked < 0.9, (img["data-figure"], inked)
        assert colours >= 20, (img["data-figure"], colours)
    assert on_screen >= 4
    # a strip of the page's background between the header and the sections is plain
    margin = pixels[:, 5:20].reshape(-1, 3)
    assert len(np.unique(margin, axis=0)) <= 3
