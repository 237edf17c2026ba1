"""The measurements of issue 21 (docs/classes.md "Measured"): several pixel classes end to end, grouped CV.

Two generated datasets, each extracted with a random-init DINOv3 ViT-S/16 of the true shape (no weights can be
downloaded here: the numbers measure the pipeline, not DINOv3's features):

* ``multispecies``: photos with two or more fish of different species each (``write_multispecies_dataset``),
  class-index masks, ``extract --classes classes.json``;
* ``kaggle-species``: the demo's Kaggle layout, one fish per photo, ``extract --classes species``.

Each is cross-validated with grouped folds (``train --split grouped --cv K``, cross-entropy) and every fold is
evaluated in full (report, species probe). Printed and written to OUT/classes-measured.json: mIoU (per fold, mean
± std), the per-image mIoU with a 95% bootstrap interval (images resampled within their fold), per-class IoU
(pooled per fold, mean over folds, and the 95% interval of the class's mean per-image IoU), and for the species
layout the species accuracy of the pixel labels beside the species probe on the same folds.

Usage: python scripts/measure-classes.py OUT [--images 48] [--per-species 12] [--epochs 8] [--folds 3]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

import fishseg
from fishseg.data.synthetic import write_demo_dataset, write_multispecies_dataset
from fishseg.evaluation.stats import paired_bootstrap_ci
from fishseg.models.backbone import save_random_backbone

SPECIES = 4


def _fold_scores(fold_dir: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    report = fold_dir / "report"
    with (report / "per_image.csv").open(newline="", encoding="utf-8") as handle:
        return json.loads((report / "metrics.json").read_text()), list(csv.DictReader(handle))


def _interval(values: list[float], folds: list[int]) -> list[float]:
    return list(paired_bootstrap_ci(np.array(values), groups=np.array(folds)))


def summarise(folds: list[tuple[dict[str, Any], list[dict[str, str]]]]) -> dict[str, Any]:
    """The CV's class scores from its folds' metrics.json and per_image.csv."""
    pixel = [metrics["pixel_classes"] for metrics, _ in folds]
    rows = [(k, row) for k, (_, fold_rows) in enumerate(folds) for row in fold_rows]
    mious = [entry["miou"] for entry in pixel]
    result: dict[str, Any] = {
        "images": len(rows), "folds": len(folds),
        "miou": {"per_fold": mious, "mean": float(np.mean(mious)), "std": float(np.std(mious))},
        "miou_per_image": {"mean": float(np.mean([float(row["iou"]) for _, row in rows])),
                           "ci95": _interval([float(row["iou"]) for _, row in rows], [k for k, _ in rows])},
        "pixel_accuracy": float(np.mean([entry["pixel_accuracy"] for entry in pixel])),
        "per_class": {},
    }
    for name in pixel[0]["names"]:
        pooled = [entry["per_class"][name]["iou"] for entry in pixel if entry["per_class"][name]["iou"] is not None]
        present = [(k, float(row[f"iou:{name}"])) for k, row in rows if row[f"iou:{name}"] != ""]
        result["per_class"][name] = {
            "iou": float(np.mean(pooled)),
            "per_image_iou_ci95": _interval([value for _, value in present], [k for k, _ in present]),
            "images": len(present)}
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
    folds = []
    for k in range(1, args.folds + 1):
        fishseg.evaluate(cache, cv / f"fold-{k}")
        folds.append(_fold_scores(cv / f"fold-{k}"))
    return summarise(folds)


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
