"""What each public API call (``fishseg.api``) returns: what was written where, and the figures.

Each result is a frozen dataclass built from the files the stage wrote (a cache, ``run.json``, ``cv.json``,
``metrics.json``), so that a result says exactly what a later command would read back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import CrossValidationRecord, RunFolder, RunRecord

__all__ = ["CrossValidationResult", "EvaluationResult", "ExtractResult", "PredictionResult", "ProbeResult",
           "TrainResult"]


@dataclasses.dataclass(frozen=True)
class ExtractResult:
    cache: Path  # the finished HDF5 cache
    images: int  # images stored in it
    skipped: tuple[str, ...]  # "image id: why" of the images left out (skip_bad=True)
    backbone: str  # its name as recorded in the cache
    random_init: bool  # True: the features carry no pretrained knowledge

    @classmethod
    def read(cls, path: Path) -> ExtractResult:
        with FeatureCache(path) as cache:
            return cls(path, len(cache), tuple(f"{image_id}: {why}" for image_id, why in cache.skipped),
                       cache.backbone.name, cache.backbone.random_init)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    out: Path  # the run folder: run.json, split.json, history.json, checkpoints
    status: str  # "finished" or "failed" (record.failure says why)
    best_val_iou: float
    best_epoch: int
    epochs_planned: int
    record: RunRecord  # run.json as written

    @classmethod
    def of(cls, out: Path, record: RunRecord) -> TrainResult:
        return cls(out, record.status, record.best_val_iou, record.best_epoch, record.epochs_planned, record)

    @property
    def val_with_duplicate_in_train(self) -> int:
        """Validation images with a near-duplicate among the training images."""
        return int(self.record.split["val_with_duplicate_in_train"])


@dataclasses.dataclass(frozen=True)
class CrossValidationResult:
    out: Path  # the cross-validation folder: cv.json and fold-k/ run folders
    folds: int
    split: str  # the split method of the folds ("random" or "grouped")
    summary: Mapping[str, tuple[float, float]]  # metric → (mean, std) over the folds
    runs: tuple[Path, ...]  # one run folder per fold

    @classmethod
    def from_cv(cls, out: Path, cv: CrossValidationRecord) -> CrossValidationResult:
        folds = cv.train_config.folds
        return cls(out, folds, cv.train_config.split,
                   {name: (value["mean"], value["std"]) for name, value in cv.summary.items()},
                   tuple(RunFolder(out).fold(fold).path for fold in range(folds)))

    @classmethod
    def read(cls, out: Path) -> CrossValidationResult:
        return cls.from_cv(out, RunFolder(out).read_cv())


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    out: Path  # the report folder: metrics.json, per_image.csv, report.html and figures
    report: Path  # report.html
    metrics: Mapping[str, Any]  # metrics.json as written
    n_images: int  # validation images scored
    mean_iou: float
    mean_dice: float
    reference_batch_iou: float  # the reference notebook's batch-averaged IoU, for comparison with it
    random_init: bool  # True: the backbone was random-init, so the numbers say nothing about its features

    @classmethod
    def of(cls, out: Path, report: Path, metrics: Mapping[str, Any]) -> EvaluationResult:
        return cls(out, report, metrics, int(metrics["n_images"]), float(metrics["mean_iou"]),
                   float(metrics["mean_dice"]), float(metrics["reference_batch_iou"]), bool(metrics["random_init"]))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    split: str  # the split the probe was fitted and scored on
    accuracy: float | None  # species accuracy on the validation images; None when skipped
    n_train: int
    n_val: int
    classes: tuple[str, ...]  # species, in the order of the confusion matrix
    confusion: tuple[tuple[int, ...], ...]  # rows: true species, columns: predicted
    skipped: str = ""  # why the probe did not run ("" when it did)
    json: Path | None = None  # where the result was also written

    @classmethod
    def of(cls, split: str, result: Mapping[str, Any], json_path: Path | None) -> ProbeResult:
        if "skipped" in result:
            return cls(split, None, 0, 0, (), (), result["skipped"], json_path)
        return cls(split, result["accuracy"], result["n_train"], result["n_val"], tuple(result["classes"]),
                   tuple(tuple(row) for row in result["confusion"]), "", json_path)


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """What a prediction wrote into the folder ``out``: ``csv`` (predictions.csv, a row per image), ``masks``
    (masks/NAME.png, 0/255 at each image's own size, each with overlays/NAME.png), and the one-line errors of the
    images left out (``skip_bad``)."""

    out: Path
    csv: Path
    masks: tuple[Path, ...]
    skipped: tuple[str, ...]
