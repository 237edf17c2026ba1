"""What each public API call (``fishseg.api``) returns: what was written where, and the figures.

Each result is a frozen dataclass built from the files the stage wrote (a cache, ``run.json``, ``cv.json``,
``metrics.json``), so that a result says exactly what a later command would read back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from fishseg.classes import Classes
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import CrossValidationRecord, RunFolder, RunRecord

__all__ = ["CrossValidationResult", "EvaluationResult", "ExtractResult", "PredictionResult", "ProbeResult",
           "TrainResult"]


@dataclasses.dataclass(frozen=True)
class ExtractResult:
    """What ``fishseg.extract`` returns: the feature cache it finished.

    ``cache``: the HDF5 cache's path; ``images``: the images stored in it; ``skipped``: "image id: why" of the
    images left out (``skip_bad=True``); ``backbone``: the backbone's name as the cache records it;
    ``random_init``: True when the backbone was random-init, so the features carry no pretrained knowledge;
    ``classes``: what a mask value means (binary, or the classes of ``classes=``); ``class_pixels``: class name →
    mask pixels of that class over all images, in class order (empty for a cache made before they were counted;
    left out of ``repr`` and of comparisons, as it follows from the cache)."""

    cache: Path
    images: int
    skipped: tuple[str, ...] = dataclasses.field(repr=False)
    backbone: str
    random_init: bool
    classes: Classes = Classes()
    class_pixels: Mapping[str, int] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, path: Path) -> ExtractResult:
        with FeatureCache(path) as cache:
            counts = {} if cache.class_pixels is None else dict(zip(cache.classes.names, cache.class_pixels.tolist()))
            return cls(path, len(cache), tuple(f"{image_id}: {why}" for image_id, why in cache.skipped),
                       cache.backbone.name, cache.backbone.random_init, cache.classes, counts)

    @property
    def class_shares(self) -> dict[str, float]:
        """Class name → its share of all mask pixels (0 … 1), in class order; empty as ``class_pixels`` is."""
        total = sum(self.class_pixels.values())
        return {name: count / total for name, count in self.class_pixels.items()} if total else {}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``fishseg.train`` returns for one run (``folds`` unset): the run folder it trained into.

    ``out``: the run folder (run.json, split.json, history.json, checkpoints/); ``status``: "finished" or "failed"
    (``record.failure`` says why); ``best_val_iou`` and ``best_epoch``: the epoch with the best validation IoU,
    whose checkpoint evaluate, predict and export use; ``epochs_planned``: the run's epochs; ``record``: run.json
    as written (settings, cache, split sizes, checkpoints), left out of ``repr``."""

    out: Path
    status: str
    best_val_iou: float
    best_epoch: int
    epochs_planned: int
    record: RunRecord = dataclasses.field(repr=False)

    @classmethod
    def of(cls, out: Path, record: RunRecord) -> TrainResult:
        return cls(out, record.status, record.best_val_iou, record.best_epoch, record.epochs_planned, record)

    @property
    def val_with_duplicate_in_train(self) -> int:
        """Validation images with a near-duplicate among the training images."""
        return int(self.record.split["val_with_duplicate_in_train"])


@dataclasses.dataclass(frozen=True)
class CrossValidationResult:
    """What ``fishseg.train`` returns with ``folds=K``: the K-fold cross-validation it trained.

    ``out``: the cross-validation folder (cv.json and one run folder ``fold-k`` per fold); ``folds``: K;
    ``split``: how the folds were drawn ("random" or "grouped"); ``summary``: metric → (mean, std) over the
    folds; ``runs``: the folds' run folders, in order (left out of ``repr``)."""

    out: Path
    folds: int
    split: str
    summary: Mapping[str, tuple[float, float]]
    runs: tuple[Path, ...] = dataclasses.field(repr=False)

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
    """What ``fishseg.evaluate`` (and ``fishseg.demo``) returns: the run's best checkpoint scored on its
    validation images.

    ``out``: the report folder (metrics.json, per_image.csv, report.html, figures); ``report``: report.html;
    ``metrics``: metrics.json as written (every number of the report; left out of ``repr``); ``n_images``: the
    validation images scored; ``mean_iou`` and ``mean_dice``: per image at threshold 0.5, averaged (with several
    pixel classes: each image's mIoU and Dice over its classes, averaged); ``reference_batch_iou``: the reference
    notebook's batch-averaged IoU, to compare with it (None with several classes); ``random_init``: True when the
    backbone was random-init, so the numbers say nothing about its features. With several pixel classes (None
    for a binary run): ``classes``, their names (the background first); ``miou``: the dataset mIoU (per-class IoU
    over all validation pixels, averaged over the classes present); ``pixel_accuracy``: the share of pixels given
    their true class; ``class_iou``: class name → its IoU over all validation pixels (None for a class neither
    true nor predicted; left out of ``repr``)."""

    out: Path
    report: Path
    metrics: Mapping[str, Any] = dataclasses.field(repr=False)
    n_images: int
    mean_iou: float
    mean_dice: float
    reference_batch_iou: float | None
    random_init: bool
    classes: tuple[str, ...] | None = None
    miou: float | None = None
    pixel_accuracy: float | None = None
    class_iou: Mapping[str, float | None] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(cls, out: Path, report: Path, metrics: Mapping[str, Any]) -> EvaluationResult:
        common = (out, report, metrics, int(metrics["n_images"]), float(metrics["mean_iou"]),
                  float(metrics["mean_dice"]))
        pixel = metrics.get("pixel_classes")
        if pixel is None:
            return cls(*common, float(metrics["reference_batch_iou"]), bool(metrics["random_init"]))
        return cls(*common, None, bool(metrics["random_init"]), tuple(pixel["names"]), float(pixel["miou"]),
                   float(pixel["pixel_accuracy"]),
                   {name: scores["iou"] for name, scores in pixel["per_class"].items()})


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What ``fishseg.probe`` returns: how well a linear classifier on the cached features tells the species apart.

    ``split``: the split it was fitted (``n_train`` images) and scored (``n_val`` images) on; ``accuracy``: species
    accuracy on the validation images (None when skipped); ``classes``: the species, in the order of
    ``confusion`` (rows: true species, columns: predicted; both left out of ``repr``); ``skipped``: why the probe
    did not run ("" when it did); ``json``: where the result was also written (None: nowhere)."""

    split: str
    accuracy: float | None
    n_train: int
    n_val: int
    classes: tuple[str, ...] = dataclasses.field(repr=False)
    confusion: tuple[tuple[int, ...], ...] = dataclasses.field(repr=False)
    skipped: str = ""
    json: Path | None = None

    @classmethod
    def of(cls, split: str, result: Mapping[str, Any], json_path: Path | None) -> ProbeResult:
        if "skipped" in result:
            return cls(split, None, 0, 0, (), (), result["skipped"], json_path)
        return cls(split, result["accuracy"], result["n_train"], result["n_val"], tuple(result["classes"]),
                   tuple(tuple(row) for row in result["confusion"]), "", json_path)


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """What ``fishseg.predict`` returns: what it wrote into the folder ``out``.

    ``csv``: predictions.csv, a row per image; ``masks``: masks/NAME.png, 0/255 at each image's own size (a run with
    several classes: mode "P", the class indices as values and the class colours as palette), each with
    overlays/NAME.png (left out of ``repr``); ``skipped``: the one-line errors of the images left out
    (``skip_bad=True``)."""

    out: Path
    csv: Path
    masks: tuple[Path, ...] = dataclasses.field(repr=False)
    skipped: tuple[str, ...]
