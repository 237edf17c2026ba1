from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fishseg
from fishseg.cli import main
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.formats.cache import FeatureCache
from fishseg.models.decoders import load_checkpoint


def test_metrics_equal_a_direct_computation(evaluated: tuple[Path, Path, dict]) -> None:
    cache_path, run_dir, metrics = evaluated
    decoder, _ = load_checkpoint(run_dir / metrics["checkpoint"])
    val_ids = json.loads((run_dir / "split.json").read_text())["val"]
    with FeatureCache(cache_path) as cache:
        indices = cache.indices_of(val_ids, run_dir)
        features = torch.from_numpy(cache.features(indices)).float().permute(0, 3, 1, 2)
        truth = cache.masks(indices).astype(bool)
        classes = [cache.class_names[k] for k in cache.class_index[indices]]
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(decoder.eval()(features), size=truth.shape[-2:], mode="bilinear")
    pred = (torch.sigmoid(logits[:, 0]) > 0.5).numpy()
    inter, union = (pred & truth).sum((1, 2)), (pred | truth).sum((1, 2))
    assert metrics["pooled_iou"] == pytest.approx(inter.sum() / union.sum())
    assert metrics["reference_batch_size"] == 8 and metrics["reference_batch_iou"] == pytest.approx(
        np.mean([inter[s:s + 8].sum() / union[s:s + 8].sum() for s in range(0, len(inter), 8)]))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    dice = np.where(pred.sum((1, 2)) + truth.sum((1, 2)) > 0,
                    2 * inter / np.maximum(pred.sum((1, 2)) + truth.sum((1, 2)), 1), 1.0)
    assert metrics["n_images"] == len(val_ids) == 4
    assert metrics["mean_iou"] == pytest.approx(iou.mean())
    assert metrics["mean_dice"] == pytest.approx(dice.mean())
    for name in set(classes):
        members = np.array(classes) == name
        assert metrics["per_class"][name]["mean_iou"] == pytest.approx(iou[members].mean())
    assert metrics["mean_iou"] <= metrics["mean_dice"]  # Dice = 2 IoU / (1 + IoU) ≥ IoU, image by image


def test_evaluate_agrees_with_the_best_epochs_validation_iou(evaluated: tuple[Path, Path, dict]) -> None:
    _, run_dir, metrics = evaluated
    run = json.loads((run_dir / "run.json").read_text())
    assert metrics["epoch"] == run["best_epoch"]
    assert metrics["mean_iou"] == pytest.approx(run["best_val_iou"], abs=1e-6)


def test_metrics_and_per_image_files_hold_the_same_numbers(evaluated: tuple[Path, Path, dict]) -> None:
    _, run_dir, metrics = evaluated
    report = run_dir.parent / "report"
    assert json.loads((report / "metrics.json").read_text()) == metrics
    rows = list(csv.DictReader((report / "per_image.csv").open()))
    assert len(rows) == metrics["n_images"]
    assert np.mean([float(r["iou"]) for r in rows]) == pytest.approx(metrics["mean_iou"], abs=1e-6)


def test_threshold_sweep_agrees_with_the_headline_metric(evaluated: tuple[Path, Path, dict]) -> None:
    sweep = evaluated[2]["threshold_sweep"]
    at_half = sweep["thresholds"].index(0.5)
    assert sweep["mean_iou"][at_half] == pytest.approx(evaluated[2]["mean_iou"])
    assert sweep["best_mean_iou"] == max(sweep["mean_iou"]) >= evaluated[2]["mean_iou"]


def test_per_class_summary_names_the_worst_image(evaluated: tuple[Path, Path, dict]) -> None:
    _, run_dir, metrics = evaluated
    rows = list(csv.DictReader((run_dir.parent / "report" / "per_image.csv").open()))
    for name, summary in metrics["per_class"].items():
        members = [r for r in rows if r["class"] == name]
        worst = min(members, key=lambda r: float(r["iou"]))
        assert summary["n_images"] == len(members) and summary["worst_image"] == worst["image_id"]
        assert summary["median_iou"] == pytest.approx(np.median([float(r["iou"]) for r in members]), abs=1e-6)


def test_richer_metrics_are_the_means_of_the_per_image_rows(evaluated: tuple[Path, Path, dict]) -> None:
    _, run_dir, metrics = evaluated
    rows = list(csv.DictReader((run_dir.parent / "report" / "per_image.csv").open()))
    for metric in ("precision", "recall", "boundary_f"):
        assert metrics[f"mean_{metric}"] == pytest.approx(np.mean([float(r[metric]) for r in rows]), abs=1e-6)
    assert metrics["boundary_tolerance_px"] == 2


def test_evaluate_refuses_a_folder_of_other_files_and_names_out(evaluated: tuple[Path, Path, dict],
                                                                tmp_path: Path) -> None:
    """A user's folder (here, predictions) is not a report's: nothing is written into it, API or CLI."""
    cache, run_dir, _ = evaluated
    photos = tmp_path / "predictions"
    photos.mkdir()
    (photos / "predictions.csv").write_text("image,fish_fraction\n")
    with pytest.raises(FishsegError, match=rf"^{re.escape(str(photos))}: not empty and not a report folder; pass an "
                                           r"empty or new folder as `out`"):
        fishseg.evaluate(cache, run_dir, out=photos, device="cpu")
    result = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--run", str(run_dir), "--out", str(photos),
                                       "--device", "cpu"])
    assert result.exit_code == 2 and result.output.startswith(
        f"Error: {photos}: not empty and not a report folder; pass an empty or new folder as --out"), result.output
    assert [path.name for path in photos.iterdir()] == ["predictions.csv"]


def test_evaluate_replaces_its_own_report_but_not_another_runs(evaluated: tuple[Path, Path, dict],
                                                               tmp_path: Path) -> None:
    cache, run_dir, metrics = evaluated
    assert metrics["run"] == str(run_dir.resolve())
    report = tmp_path / "report"
    run_evaluation(cache, run_dir, report, device="cpu", report=False)
    (report / "per_image.csv").write_text("stale")
    assert run_evaluation(cache, run_dir, report, device="cpu", report=False)["mean_iou"] == metrics["mean_iou"]
    assert (report / "per_image.csv").read_text() != "stale"
    other = Path(shutil.copytree(run_dir, tmp_path / "other"))
    written = (report / "metrics.json").read_bytes()
    with pytest.raises(FishsegError, match=rf"^{re.escape(str(report))}: the report folder of another run "
                                           rf"\({re.escape(str(run_dir.resolve()))}\); pass another `out`"):
        run_evaluation(cache, other, report, device="cpu", report=False)
    assert (report / "metrics.json").read_bytes() == written
