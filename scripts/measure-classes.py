"""The measurements of issue 21 (docs/classes.md "Measured"): several pixel classes end to end, grouped CV.

Two generated datasets, each extracted with a random-init DINOv3 ViT-S/16 of the true shape (no weights can be
downloaded here: the numbers measure the pipeline, not DINOv3's features):

* ``multispecies``: photos with two or more fish of different species each (``write_multispecies_dataset``),
  class-index masks, ``extract --classes classes.json``;
* ``kaggle-species``: the demo's Kaggle layout, one fish per photo, ``extract --classes species``.

Each is cross-validated with grouped folds (``train --split grouped --cv K``, cross-entropy) and every fold is
evaluated in full (report, species probe). Printed and written to OUT/classes-measured.json: the mIoU and each
class's IoU (pooled over a fold's validation images, mean over folds) with 95% bootstrap intervals (each fold's
images resampled with replacement, the pooled scores recomputed from the images' confusion matrices), the
per-image mIoU with its interval, pixel accuracy, and for the species layout the species accuracy of the pixel
labels beside the species probe on the same folds.

Usage: python scripts/measure-classes.py OUT [--images 48] [--per-species 12] [--epochs 8] [--folds 3]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fishseg
from fishseg.data.synthetic import write_demo_dataset, write_multispecies_dataset
from fishseg.evaluation.evaluate import score_labels
from fishseg.evaluation.metrics import class_iou, present_classes
from fishseg.evaluation.stats import paired_bootstrap_ci
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import SPLIT_FILE, RunFolder
from fishseg.models.backbone import save_random_backbone

SPECIES = 4
RESAMPLES = 2000


def fold_confusions(cache_path: Path, fold_dir: Path) -> np.ndarray:
    """The per-image confusion matrices (N×C×C) of a fold's best checkpoint on its validation images."""
    run = RunFolder(fold_dir)
    record, decoder, checkpoint = run.load()
    with FeatureCache(cache_path) as cache:
        val_idx = cache.indices_of(run.read_split(record)["val"], fold_dir / SPLIT_FILE)
        return score_labels(decoder, cache, val_idx, classes=checkpoint.pixel_classes, batch_size=16,
                            device=torch.device("cpu"), layers=checkpoint.layers)["confusion"]


def pooled_scores(confusions: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Per-class IoU (C, NaN where a class is in no fold) and mIoU, each pooled per fold then averaged over folds."""
    per_fold = []
    for confusion in confusions:
        summed = torch.from_numpy(confusion.sum(0))
        per_fold.append(torch.where(present_classes(summed), class_iou(summed), torch.nan).numpy())
    per_fold = np.array(per_fold)
    return np.nanmean(per_fold, 0), float(np.mean(np.nanmean(per_fold, 1)))


def bootstrap(confusions: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile intervals (2×C per class, 2 for the mIoU) of ``pooled_scores``, images resampled within
    their fold."""
    rng = np.random.default_rng(seed)
    draws = [pooled_scores([matrix[rng.integers(0, len(matrix), len(matrix))] for matrix in confusions])
             for _ in range(RESAMPLES)]
    return (np.nanpercentile([classes for classes, _ in draws], [2.5, 97.5], axis=0),
            np.percentile([miou for _, miou in draws], [2.5, 97.5]))


def _fold_scores(fold_dir: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    report = fold_dir / "report"
    with (report / "per_image.csv").open(newline="", encoding="utf-8") as handle:
        return json.loads((report / "metrics.json").read_text()), list(csv.DictReader(handle))


def _interval(values: list[float], folds: list[int]) -> list[float]:
    return list(paired_bootstrap_ci(np.array(values), groups=np.array(folds)))


def summarise(folds: list[tuple[dict[str, Any], list[dict[str, str]]]], confusions: list[np.ndarray]) -> dict:
    """The CV's class scores from its folds' metrics.json, per_image.csv and confusion matrices."""
    pixel = [metrics["pixel_classes"] for metrics, _ in folds]
    rows = [(k, row) for k, (_, fold_rows) in enumerate(folds) for row in fold_rows]
    mious = [entry["miou"] for entry in pixel]
    class_ious, miou = pooled_scores(confusions)
    class_ci, miou_ci = bootstrap(confusions)
    assert np.isclose(miou, np.mean(mious)), "the confusion matrices disagree with the folds' metrics.json"
    result: dict[str, Any] = {
        "images": len(rows), "folds": len(folds),
        "miou": {"per_fold": mious, "mean": miou, "std": float(np.std(mious)), "ci95": miou_ci.tolist()},
        "miou_per_image": {"mean": float(np.mean([float(row["iou"]) for _, row in rows])),
                           "ci95": _interval([float(row["iou"]) for _, row in rows], [k for k, _ in rows])},
        "pixel_accuracy": float(np.mean([entry["pixel_accuracy"] for entry in pixel])),
        "per_class": {},
    }
    for k, name in enumerate(pixel[0]["names"]):
        result["per_class"][name] = {"iou": float(class_ious[k]), "ci95": class_ci[:, k].tolist(),
                                     "images_with_it": sum(row[f"iou:{name}"] != "" for _, row in rows)}
    if "species_accuracy" in pixel[0]:
        result["species_accuracy_pixel_labels"] = float(np.mean([entry["species_accuracy"] for entry in pixel]))
        result["species_probe_accuracy"] = float(np.mean([metrics["species_probe"]["accuracy"]
                                                          for metrics, _ in folds]))
    return result


def measure(name: str, data: Path, classes: str | Path, backbone: Path, out: Path, args: argparse.Namespace) -> dict:
    cache = out / f"{name}.h5"
    extracted = fishseg.extract(data, cache, backbone=str(backbone), classes=classes, overwrite=True)
    print(f"{name}: {extracted}")
    cv = out / f"{name}-cv"
    fishseg.train(cache, cv, split="grouped", folds=args.folds, epochs=args.epochs, overwrite=True)
    return summarise_cv(cache, cv, args.folds)


def summarise_cv(cache: Path, cv: Path, folds: int) -> dict:
    """Evaluate every fold in full (report, species probe) and summarise the cross-validation."""
    for k in range(1, folds + 1):
        fishseg.evaluate(cache, cv / f"fold-{k}")
    return summarise([_fold_scores(cv / f"fold-{k}") for k in range(1, folds + 1)],
                     [fold_confusions(cache, cv / f"fold-{k}") for k in range(1, folds + 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=48, help="multi-species photos")
    parser.add_argument("--per-species", type=int, default=12, help="Kaggle-layout photos per species")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    backbone = save_random_backbone(args.out / "vits16-random")
    multi = write_multispecies_dataset(args.out / "multispecies", images=args.images, species=SPECIES)
    kaggle = write_demo_dataset(args.out / "kaggle", classes=SPECIES, images_per_class=args.per_species)
    results = {
        "backbone": "random-init DINOv3 ViT-S/16 (384-d, 12 blocks, 4 registers), 448 px: the pipeline, not DINOv3",
        "settings": vars(args) | {"out": str(args.out)},
        "multispecies": measure("multispecies", multi, multi / "classes.json", backbone, args.out, args),
        "kaggle-species": measure("kaggle-species", kaggle, "species", backbone, args.out, args),
    }
    (args.out / "classes-measured.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
