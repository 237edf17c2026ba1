from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fishseg.evaluation.report
from fishseg.evaluation.report import (DPI, REFERENCE_NOTE, Example, _epoch_figure, _gallery_figure, _legible,
                                       _probe_figure, fmt, gallery_positions)
from fishseg.formats.runs import REPORT_FILES

CURVE_FILES = ["01_train_iteration_loss.png", "02_train_iteration_iou.png", "03_epoch_loss.png",
               "04_val_iteration_loss.png", "05_epoch_iou.png", "06_val_iteration_iou.png"]


@pytest.fixture(scope="module")
def report(evaluated: tuple[Path, Path, dict]) -> Path:
    return evaluated[1].parent / "report"


def test_every_file_is_written_with_the_expected_size(report: Path) -> None:
    expected = {name: (800, 450) for name in CURVE_FILES}
    expected.update({"08_iou_histogram.png": (800, 450), "09_threshold_sweep.png": (800, 450)})
    for name, size in expected.items():
        assert Image.open(report / name).size == size, name
    for name in ("07_per_class.png", "10_feature_pca.png", "gallery_1_random.png", "gallery_2_best.png",
                 "gallery_3_worst.png", "report.html", "report.md", "epochs.csv", "metrics.json", "per_image.csv"):
        assert (report / name).stat().st_size > 0, name
    # 4 validation images: every gallery shows all 4, two per row → 2 rows of 4 panels
    assert Image.open(report / "gallery_1_random.png").size == (int(8.4 * 2 * DPI), int((2.45 * 2 + 0.7) * DPI))
    assert not list(report.glob(".*.tmp"))


def test_page_and_markdown_show_the_numbers_of_metrics_json(report: Path, evaluated: tuple[Path, Path, dict]) -> None:
    metrics = json.loads((report / "metrics.json").read_text())
    page = (report / "report.html").read_text()
    shown = dict(re.findall(r'data-metric="(\w+)">([^<]*)<', page))
    assert shown == {"val_with_duplicate_in_train": str(metrics["val_with_duplicate_in_train"]),
                     "n_images": str(metrics["n_images"]), "mean_iou": fmt(metrics["mean_iou"]),
                     "mean_dice": fmt(metrics["mean_dice"]), "median_iou": fmt(metrics["median_iou"]),
                     "median_dice": fmt(metrics["median_dice"]), "threshold": str(metrics["threshold"]),
                     "mean_boundary_f": fmt(metrics["mean_boundary_f"]), "pooled_iou": fmt(metrics["pooled_iou"]),
                     "reference_batch_iou": fmt(metrics["reference_batch_iou"])}
    markdown = (report / "report.md").read_text()
    assert f"- mean IoU: {fmt(metrics['mean_iou'])}" in markdown
    assert f"- mean Dice: {fmt(metrics['mean_dice'])}" in markdown
    assert f"- reference batch IoU (batches of 8, pixels pooled): {fmt(metrics['reference_batch_iou'])}" in markdown
    assert REFERENCE_NOTE in markdown and html.escape(REFERENCE_NOTE) in page
    for name, summary in metrics["per_class"].items():
        row = f"| {name} | {summary['n_images']} | {fmt(summary['mean_iou'])} | {fmt(summary['median_iou'])} |"
        assert row in markdown and f"<td>{name}</td><td>{summary['n_images']}</td>" in page
    assert "random-init" in page and "random-init" in markdown  # the toy backbone is marked random-init
    epochs = json.loads((evaluated[1] / "history.json").read_text())["epochs"]
    assert (report / "epochs.csv").read_text().count("\n") == len(epochs) + 1
    for name in [*CURVE_FILES, "gallery_3_worst.png"]:
        assert f'src="{name}"' in page and f"]({name})" in markdown


def test_galleries_stay_legible_at_the_real_validation_size() -> None:
    positions = gallery_positions(np.linspace(0, 1, 1800), seed=42)
    assert [len(p) for p in positions.values()] == [20, 5, 5]
    assert positions["best"][0] == 1799 and positions["worst"][0] == 0
    blank = Example("Fish_Dataset/Fish_Dataset/Hourse Mackerel/Hourse Mackerel/00001.png", "Hourse Mackerel", 0.5,
                    np.zeros((224, 224, 3), np.uint8), np.zeros((448, 448), bool), np.ones((448, 448), bool),
                    np.zeros((28, 28, 8), np.float16))
    figure = _gallery_figure([blank] * 20, "20 random validation images")
    width, height = figure.get_size_inches() * DPI
    assert (width, height) == pytest.approx((1680, 2520))  # 10 rows of 2 images × 4 panels, ≈ 200 px a panel


BROWSER_CHECK = """<script>window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute("src"));
  const out = document.createElement("pre"); out.id = "fishseg-check";
  out.textContent = JSON.stringify({images: document.images.length, broken}); document.body.appendChild(out);
});</script>"""


def test_report_loads_in_a_real_browser_with_no_missing_images(report: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); browser check skipped")
    probe = report / "browser_probe.html"  # beside report.html so relative image paths resolve the same way
    probe.write_text((report / "report.html").read_text().replace("</body>", BROWSER_CHECK + "</body>"))
    try:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={report.parent / 'chromium-profile'}", "--virtual-time-budget=10000",
             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="fishseg-check">(.*?)</pre>', result.stdout)
    assert found, result.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check == {"images": (report / "report.html").read_text().count("<img "), "broken": []}
    assert check["images"] == 14  # 6 curves, per class, histogram, threshold, PCA, species probe, 3 galleries


def _example(image_id: str) -> Example:
    return Example(image_id, "鲤鱼", 0.5, np.zeros((16, 16, 3), np.uint8), np.zeros((32, 32), bool),
                   np.ones((32, 32), bool), np.zeros((4, 4, 8), np.float16))


def test_cjk_file_names_draw_without_a_missing_glyph_warning(tmp_path: Path) -> None:
    figure = _gallery_figure([_example("金鱼/鲤鱼 01.png")], "1 random validation image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure.savefig(tmp_path / "g.png", format="png")
    assert Image.open(tmp_path / "g.png").size[0] > 0


def test_a_character_the_default_font_lacks_uses_an_installed_font_that_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fishseg.evaluation.report, "_default_font", lambda: ("DejaVu Sans", frozenset(map(ord, "ab /."))))
    monkeypatch.setattr(fishseg.evaluation.report, "_other_fonts", lambda: (("Noto Sans CJK JP", frozenset(map(ord, "金鱼"))),))
    assert _legible("a/金鱼.b") == ("a/金鱼.b", ["DejaVu Sans", "Noto Sans CJK JP"])
    assert _legible("a 鲤.b") == ("a ?.b", ["DejaVu Sans"])  # no installed font draws 鲤


def test_other_fonts_are_read_only_for_a_character_the_default_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    def unread() -> tuple:
        raise AssertionError("other fonts read for text the default font draws")

    monkeypatch.setattr(fishseg.evaluation.report, "_other_fonts", unread)
    assert _legible("Fish_Dataset/Red Mullet 00012.png") == ("Fish_Dataset/Red Mullet 00012.png", ["DejaVu Sans"])


def test_epoch_plots_tick_whole_epochs_and_the_probe_title_stays_inside_the_image() -> None:
    epochs = [{"epoch": e, **{f"{s}_loss{x}": 0.1 for s in ("train", "val") for x in ("", "_std")}} for e in (1, 2, 3)]
    axes = _epoch_figure(epochs, "loss", "Loss per epoch", "loss").axes[0]
    assert all(float(tick).is_integer() for tick in axes.get_xticks())
    probe = _probe_figure({"classes": ["Black Sea Sprat", "Gilt-Head Bream"], "confusion": [[3, 1], [0, 4]],
                           "accuracy": 0.875})
    probe.draw_without_rendering()
    title, image = probe._suptitle.get_window_extent(), probe.bbox
    assert image.x0 + 5 < title.x0 and title.x1 < image.x1 - 5 and title.y1 < image.y1


def test_the_run_folder_format_names_every_file_a_report_holds(report: Path) -> None:
    """runs.REPORT_FILES is what a replaced or resumed run removes from its report folder: it must be all of it."""
    assert {path.name for path in report.iterdir()} == set(REPORT_FILES)
