"""Evaluating a run with several pixel classes: metrics.json's pixel_classes against scikit-learn, per_image.csv,
the report, the API result and the CLI line; binary evaluations keep their keys and columns."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, jaccard_score, precision_score, recall_score

import fishseg
from fishseg.cli import main
from fishseg.evaluation.report import fmt
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import EVERY_REPORT_FILE, REPORT_FILES
from fishseg.models.decoders import load_checkpoint, segment
from tests.helpers import write_toy_cache

CLASSES = ("background", "a", "b")
BINARY_COLUMNS = ["image_id", "class", "iou", "dice", "precision", "recall", "boundary_f"]
SKLEARN_SCORES = {"iou": jaccard_score, "dice": f1_score, "precision": precision_score, "recall": recall_score}


@pytest.fixture(scope="module", params=["index", "species"])
def classes_run(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, fishseg.EvaluationResult]:
    """A 3-class toy cache (as index masks, or as species masks), a short ce run on it, and its evaluation."""
    root = tmp_path_factory.mktemp(f"classes-{request.param}")
    cache = write_toy_cache(root / "toy.h5", n_images=20, classes=CLASSES, mask_format=request.param)
    fishseg.train(cache, root / "run", epochs=3, batch_size=4, seed=3, loss="ce", device="cpu")
    return cache, root / "run", fishseg.evaluate(cache, root / "run", out=root / "report", device="cpu")


def _truth_and_labels(cache_path: Path, run_dir: Path, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """The validation masks and the checkpoint's arg-max labels, computed here without fishseg's scoring."""
    decoder, _ = load_checkpoint(run_dir / checkpoint)
    val_ids = json.loads((run_dir / "split.json").read_text())["val"]
    with FeatureCache(cache_path) as cache:
        indices = cache.indices_of(val_ids, run_dir)
        features, truth = torch.from_numpy(cache.features(indices)).float(), cache.masks(indices)
    with torch.no_grad():
        logits = segment(decoder.eval(), features, truth.shape[-1])
    return truth.astype(np.int64), logits.argmax(1).numpy()


def test_pixel_classes_agree_with_scikit_learn(classes_run: tuple[Path, Path, fishseg.EvaluationResult]) -> None:
    cache, run_dir, result = classes_run
    metrics, pixel = result.metrics, result.metrics["pixel_classes"]
    truth, pred = _truth_and_labels(cache, run_dir, metrics["checkpoint"])
    counts = confusion_matrix(truth.ravel(), pred.ravel(), labels=range(len(CLASSES)))
    assert pixel["confusion_counts"] == counts.tolist()
    np.testing.assert_allclose(pixel["confusion"], counts / np.maximum(counts.sum(1, keepdims=True), 1))
    present = [k for k in range(len(CLASSES)) if counts[k].sum() + counts[:, k].sum() > 0]
    assert pixel["names"] == list(CLASSES) and len(pixel["colours"]) == len(CLASSES)
    assert pixel["miou"] == pytest.approx(jaccard_score(truth.ravel(), pred.ravel(), labels=present, average="macro"))
    assert pixel["pixel_accuracy"] == pytest.approx(accuracy_score(truth.ravel(), pred.ravel()))
    for metric, score in SKLEARN_SCORES.items():
        expected = score(truth.ravel(), pred.ravel(), labels=present, average=None, zero_division=0)
        assert [pixel["per_class"][CLASSES[k]][metric] for k in present] == pytest.approx(expected.tolist()), metric
    for k, name in enumerate(CLASSES):
        assert (pixel["per_class"][name]["true_pixels"], pixel["per_class"][name]["predicted_pixels"]) == (
            counts[k].sum(), counts[:, k].sum())
    per_image = [jaccard_score(t.ravel(), p.ravel(), labels=sorted(set(t.ravel()) | set(p.ravel())), average="macro")
                 for t, p in zip(truth, pred)]
    assert pixel["miou_per_image"] == pytest.approx(np.mean(per_image)) == metrics["mean_iou"]
    assert metrics["pooled_iou"] == pixel["miou"] and result.miou == pixel["miou"]
    assert metrics["threshold"] is None and "threshold_sweep" not in metrics and "reference_batch_iou" not in metrics
    assert "accuracy" in metrics["species_probe"]  # the probe still runs on the image classes


def test_species_accuracy_only_for_species_masks(classes_run: tuple[Path, Path, fishseg.EvaluationResult]) -> None:
    cache, run_dir, result = classes_run
    pixel = result.metrics["pixel_classes"]
    with FeatureCache(cache) as opened:
        species = opened.config.mask_format == "species"
    assert ("species_accuracy" in pixel) == species
    if species:
        truth, pred = _truth_and_labels(cache, run_dir, result.metrics["checkpoint"])
        dominant = [(np.bincount(t.ravel(), minlength=3)[1:].argmax(), np.bincount(p.ravel(), minlength=3)[1:])
                    for t, p in zip(truth, pred)]
        right = [areas.sum() > 0 and areas.argmax() == true for true, areas in dominant]
        assert pixel["species_accuracy"] == pytest.approx(np.mean(right))


def test_per_image_rows_hold_each_images_miou_and_class_ious(
        classes_run: tuple[Path, Path, fishseg.EvaluationResult]) -> None:
    cache, run_dir, result = classes_run
    with (result.out / "per_image.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == [*BINARY_COLUMNS, *(f"iou:{name}" for name in CLASSES)]
    truth, pred = _truth_and_labels(cache, run_dir, result.metrics["checkpoint"])
    for row, t, p in zip(rows, truth, pred):
        for k, name in enumerate(CLASSES):
            if not ((t == k) | (p == k)).any():
                assert row[f"iou:{name}"] == ""
                continue
            assert float(row[f"iou:{name}"]) == pytest.approx(((t == k) & (p == k)).sum() / ((t == k) | (p == k)).sum())
        scored = [float(row[f"iou:{name}"]) for name in CLASSES if row[f"iou:{name}"]]
        assert float(row["iou"]) == pytest.approx(np.mean(scored))
    assert np.mean([float(row["iou"]) for row in rows]) == pytest.approx(result.mean_iou)
    for metric in ("dice", "precision", "recall", "boundary_f"):
        assert np.mean([float(row[metric]) for row in rows]) == pytest.approx(result.metrics[f"mean_{metric}"])


def test_report_shows_the_pixel_classes(classes_run: tuple[Path, Path, fishseg.EvaluationResult]) -> None:
    _, _, result = classes_run
    written = {path.name for path in result.out.iterdir()}
    assert "12_pixel_confusion.png" in written and "09_threshold_sweep.png" not in written
    assert written <= set(EVERY_REPORT_FILE) and "12_pixel_confusion.png" not in REPORT_FILES
    pixel = result.metrics["pixel_classes"]
    page, markdown = (result.out / "report.html").read_text(), (result.out / "report.md").read_text()
    shown = dict(re.findall(r'data-metric="([\w.]+)">([^<]*)<', page))
    assert shown["pixel_classes.miou"] == fmt(pixel["miou"])
    assert shown["pixel_classes.miou_per_image"] == fmt(pixel["miou_per_image"])
    assert shown["pixel_classes.pixel_accuracy"] == fmt(pixel["pixel_accuracy"]) and "threshold" not in shown
    for name, scores in pixel["per_class"].items():
        cells = [fmt(scores[m]) if scores[m] is not None else "–" for m in ("iou", "dice", "precision", "recall")]
        assert f"| {name} | {' | '.join(cells)} |" in markdown
    assert "val mIoU" in markdown and 'src="12_pixel_confusion.png"' in page and "BCE" not in markdown


def test_result_and_cli_give_the_miou(classes_run: tuple[Path, Path, fishseg.EvaluationResult], tmp_path: Path) -> None:
    cache, run_dir, result = classes_run
    pixel = result.metrics["pixel_classes"]
    assert (result.classes, result.pixel_accuracy, result.reference_batch_iou) == (
        CLASSES, pixel["pixel_accuracy"], None)
    assert result.class_iou == {name: scores["iou"] for name, scores in pixel["per_class"].items()}
    if "species_accuracy" in pixel:
        return  # the CLI's line is the same for species masks: checked once, on index masks
    run = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--run", str(run_dir), "--out",
                                    str(tmp_path / "report"), "--device", "cpu"])
    assert run.exit_code == 0, run.output
    assert (f"validation images: mIoU {pixel['miou']:.4f} (per-image mean {pixel['miou_per_image']:.4f}), "
            f"pixel accuracy {pixel['pixel_accuracy']:.4f}, mean Dice") in run.output


def test_a_binary_evaluation_has_no_class_keys_or_columns(evaluated: tuple[Path, Path, dict]) -> None:
    _, run_dir, metrics = evaluated
    assert "pixel_classes" not in metrics and metrics["threshold"] == 0.5 and "threshold_sweep" in metrics
    with (run_dir.parent / "report" / "per_image.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == BINARY_COLUMNS
    result = fishseg.EvaluationResult.of(run_dir.parent / "report", run_dir.parent / "report" / "report.html", metrics)
    assert (result.classes, result.miou, result.pixel_accuracy, result.class_iou) == (None, None, None, None)
