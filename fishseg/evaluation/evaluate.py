"""Stage 3: score a run's checkpoint on its validation split, from the cache alone.

Computes the numbers (per-image scores, threshold sweep, per-class summaries) and the arrays the
report shows (gallery predictions, a sample of patch features); ``fishseg.evaluation.report`` renders them.
A run with several pixel classes is scored by arg max from per-image confusion matrices: per-image mIoU
where binary has IoU, no threshold, and the per-class scores under ``pixel_classes`` in metrics.json.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from fishseg.classes import Classes
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import (BOUNDARY_TOLERANCE, REFERENCE_BATCH, THRESHOLD, THRESHOLDS, batch_pooled_iou,
                                        boundary_f_per_image, class_boundary_f, class_counts, class_scores,
                                        confusion_matrices, dataset_mean_iou, mean_iou_per_image, mean_over_present,
                                        normalized_confusion, pixel_accuracy, pixel_counts, precision_per_image,
                                        present_classes, recall_per_image, species_accuracy, summarize,
                                        sweep_thresholds)
from fishseg.evaluation.probe import run_probe
from fishseg.evaluation.report import Example, ReportData, gallery_positions, write_report
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import (EVERY_REPORT_FILE, METRICS_FILE, PER_IMAGE_FILE, REPORT_DIR, RUN_FILE, SPLIT_FILE,
                                  RunFolder, RunRecord)
from fishseg.models.decoders import segment, uses_image
from fishseg.runtime import atomic_path, autocast, make_output_dir, read_json, resolve_device, write_json

logger = logging.getLogger(__name__)

PCA_IMAGES = 64  # validation images whose patches fit the PCA of the feature picture
READ_CHUNK = 512  # images read from the source at once (~0.6 GB of 28×28×384 float16 features with 448² masks)


class ScoringSource(Protocol):
    """What scoring reads, for image indices in the given order: a ``FeatureCache`` (NumPy arrays read from
    HDF5), or a store of tensors already resident on the device (a sweep's), returned as they are."""

    def features(self, indices: np.ndarray, *, layers: Sequence[int] | None = None) -> np.ndarray | torch.Tensor:
        ...  # float B×h×w×C of the cached blocks ``layers``

    def masks(self, indices: np.ndarray) -> np.ndarray | torch.Tensor:
        ...  # uint8 or bool B×S×S (class indices with several classes)

    def previews(self, indices: np.ndarray) -> np.ndarray | torch.Tensor:
        ...  # uint8 B×P×P×3


def _on(device: torch.device, array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(array).to(device, non_blocking=True)


def _logits(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, batch_size: int,
            device: torch.device, layers: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits, truth B×S×S as the source holds it)`` for ``indices`` in order, batch by batch, the decoder
    reading the cached blocks ``layers`` (and the cached previews guiding a decoder that uses the image); logits
    as ``segment`` returns them (binary B×S×S, several classes B×C×S×S). The source is read in chunks of
    ``READ_CHUNK`` images, one read per array, not one per batch."""
    decoder.eval().to(device)
    guided = uses_image(decoder)
    for start in range(0, len(indices), READ_CHUNK):
        chunk = indices[start:start + READ_CHUNK]
        features = _on(device, source.features(chunk, layers=layers))
        truths = _on(device, source.masks(chunk))
        guides = _on(device, source.previews(chunk)) if guided else None
        for first in range(0, len(chunk), batch_size):
            rows = slice(first, first + batch_size)
            with autocast(device, "decoder"):
                logits = segment(decoder, features[rows], truths.shape[-1], None if guides is None else guides[rows])
            yield logits, truths[rows]


def _probabilities(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, batch_size: int,
                   device: torch.device, layers: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A binary run's ``(probabilities B×S×S, truth B×S×S bool)`` batch by batch, as ``_logits``."""
    for logits, truth in _logits(decoder, source, indices, batch_size, device, layers):
        yield torch.sigmoid(logits.float()), truth.bool()


def _batch_scores(probs: torch.Tensor, truth: torch.Tensor, thresholds: tuple[float, ...]) -> dict[str, torch.Tensor]:
    pred = probs > THRESHOLD
    intersection, union = pixel_counts(pred, truth)
    sweep = sweep_thresholds(probs, truth, thresholds)
    return {"sweep_iou": sweep["iou"], "sweep_dice": sweep["dice"], "precision": precision_per_image(pred, truth),
            "recall": recall_per_image(pred, truth), "boundary_f": boundary_f_per_image(pred, truth),
            "intersection": intersection, "union": union}


@torch.inference_mode()
def score_images(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, *, batch_size: int,
                 device: torch.device, layers: tuple[int, ...],
                 thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, np.ndarray]:
    """Per-image scores of ``indices``: ``sweep_iou`` and ``sweep_dice`` at every one of ``thresholds``
    (T×N); ``precision``, ``recall``, ``boundary_f`` and the pixel ``intersection`` and ``union`` at
    ``THRESHOLD`` (N). ``source``: a ``FeatureCache`` or device-resident tensors (``ScoringSource``)."""
    batches = _probabilities(decoder, source, indices, batch_size, device, layers)
    parts = [_batch_scores(probs, truth, thresholds) for probs, truth in batches]
    return {name: torch.cat([part[name] for part in parts], dim=-1).cpu().numpy() for name in parts[0]}


@torch.inference_mode()
def score_labels(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, *, classes: Classes,
                 batch_size: int, device: torch.device, layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-image ``confusion`` matrices (N×C×C, rows true) and per-class ``boundary_f`` (N×C) of the arg-max
    labels of a run with several classes, accumulated batch by batch (no prediction is kept)."""
    parts = []
    for logits, truth in _logits(decoder, source, indices, batch_size, device, layers):
        pred, truth = classes.labels(logits), truth.long()
        parts.append({"confusion": confusion_matrices(pred, truth, len(classes)),
                      "boundary_f": class_boundary_f(pred, truth, len(classes))})
    return {name: torch.cat([part[name] for part in parts]).cpu().numpy() for name in parts[0]}


@torch.inference_mode()
def predict_masks(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, *, batch_size: int,
                  device: torch.device, layers: tuple[int, ...], classes: Classes = Classes()) -> np.ndarray:
    """N×S×S predictions: boolean at ``THRESHOLD`` (binary), uint8 class indices by arg max (several classes)."""
    if classes.binary:
        return np.concatenate([(probs > THRESHOLD).cpu().numpy()
                               for probs, _ in _probabilities(decoder, source, indices, batch_size, device, layers)])
    return np.concatenate([classes.labels(logits).to(torch.uint8).cpu().numpy()
                           for logits, _ in _logits(decoder, source, indices, batch_size, device, layers)])


def summarize_scores(scores: dict[str, np.ndarray], classes: list[str], image_ids: list[str]) -> dict[str, Any]:
    """Dataset and per-class summaries of per-image scores (``{"iou": N, "dice": N}``)."""
    per_class = {}
    for name in sorted(set(classes)):
        members = np.flatnonzero(np.array(classes) == name)
        worst = members[np.argmin(scores["iou"][members])]
        per_class[name] = {"n_images": len(members), "worst_image": image_ids[worst],
                           "worst_iou": float(scores["iou"][worst])}
        for metric, values in scores.items():
            per_class[name].update({f"mean_{metric}": float(values[members].mean()),
                                    f"median_{metric}": float(np.median(values[members]))})
    summaries = {metric: summarize(values) for metric, values in scores.items()}
    means = {f"{stat}_{metric}": summary[stat] for metric, summary in summaries.items() for stat in ("mean", "median")}
    return {"n_images": len(classes), **means, **summaries, "per_class": per_class}


def summarize_sweep(raw: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean IoU and Dice per threshold, and the threshold with the best mean IoU (chosen on val itself)."""
    mean_iou, mean_dice = raw["sweep_iou"].mean(axis=1), raw["sweep_dice"].mean(axis=1)
    best = int(np.argmax(mean_iou))
    return {"thresholds": list(THRESHOLDS), "mean_iou": mean_iou.tolist(), "mean_dice": mean_dice.tolist(),
            "best_threshold": THRESHOLDS[best], "best_mean_iou": float(mean_iou[best])}


def summarize_pixel_classes(confusion: torch.Tensor, boundary_f: torch.Tensor, classes: Classes, *,
                            species: bool) -> dict[str, Any]:
    """metrics.json's ``pixel_classes`` from per-image confusion matrices N×C×C and per-class boundary F N×C:
    per-class scores over all pixels of the split (boundary F: the mean over the images where the class is true
    or predicted; None for a class neither true nor predicted anywhere), both mIoUs, pixel accuracy, the
    confusion matrix and, for ``species`` masks, the species accuracy of the pixel labels."""
    pooled = confusion.sum(0)
    present, in_image = present_classes(pooled), present_classes(confusion)
    scores = {**class_scores(pooled), "boundary_f": mean_over_present(boundary_f.T, in_image.T)}
    _, predicted, true = class_counts(pooled)
    per_class = {name: {**{metric: float(values[k]) if present[k] else None for metric, values in scores.items()},
                        "true_pixels": int(true[k]), "predicted_pixels": int(predicted[k])}
                 for k, name in enumerate(classes.names)}
    summary = {"names": list(classes.names), "colours": [list(colour) for colour in classes.colours],
               "miou": dataset_mean_iou(confusion), "miou_per_image": float(mean_iou_per_image(confusion).mean()),
               "pixel_accuracy": pixel_accuracy(confusion), "per_class": per_class,
               "confusion": normalized_confusion(pooled).tolist(), "confusion_counts": pooled.tolist()}
    return {**summary, "species_accuracy": species_accuracy(confusion)} if species else summary


@dataclasses.dataclass(frozen=True)
class _Scores:
    """What scoring gives evaluate_run: per-image scores, the dataset keys of metrics.json that follow their
    summaries, and with several classes each image's IoU per class (N×C, NaN where neither true nor predicted)."""

    per_image: dict[str, np.ndarray]  # iou, dice, precision, recall, boundary_f
    dataset: dict[str, Any]
    class_ious: np.ndarray | None = None


def _score_binary(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, *, full: bool,
                  **options: Any) -> _Scores:
    """Per-image scores at ``THRESHOLD``, pooled and reference batch IoU, and with ``full`` the threshold sweep."""
    thresholds = THRESHOLDS if full else (THRESHOLD,)
    raw = score_images(decoder, source, indices, thresholds=thresholds, **options)
    at = thresholds.index(THRESHOLD)
    per_image = {"iou": raw["sweep_iou"][at], "dice": raw["sweep_dice"][at],
                 **{name: raw[name] for name in ("precision", "recall", "boundary_f")}}
    dataset = {"pooled_iou": float(raw["intersection"].sum() / max(raw["union"].sum(), 1)),
               "reference_batch_iou": batch_pooled_iou(raw["intersection"], raw["union"], REFERENCE_BATCH),
               "reference_batch_size": REFERENCE_BATCH}
    return _Scores(per_image, {**dataset, "threshold_sweep": summarize_sweep(raw)} if full else dataset)


def _score_classes(decoder: torch.nn.Module, source: ScoringSource, indices: np.ndarray, *, classes: Classes,
                   species: bool, **options: Any) -> _Scores:
    """Per-image scores averaged over the classes present in each image (``iou``: the image's mIoU), ``pooled_iou``
    = dataset mIoU, and ``pixel_classes``."""
    raw = score_labels(decoder, source, indices, classes=classes, **options)
    confusion, boundary_f = torch.from_numpy(raw["confusion"]), torch.from_numpy(raw["boundary_f"])
    present = present_classes(confusion)
    per_class = {**class_scores(confusion), "boundary_f": boundary_f}
    per_image = {name: mean_over_present(values, present).numpy() for name, values in per_class.items()}
    dataset = {"pooled_iou": dataset_mean_iou(confusion),
               "pixel_classes": summarize_pixel_classes(confusion, boundary_f, classes, species=species)}
    class_ious = torch.where(present, per_class["iou"], torch.nan).numpy()
    return _Scores(per_image, dataset, class_ious)


def _report_arrays(decoder: torch.nn.Module, cache: FeatureCache, val_idx: np.ndarray, ious: np.ndarray,
                   seed: int, device: torch.device, layers: tuple[int, ...],
                   classes: Classes) -> tuple[dict[str, list[Example]], np.ndarray]:
    """Gallery examples (predicted once for the union of galleries) and a patch sample for the PCA."""
    positions = gallery_positions(ious, seed)
    shown = np.unique(np.concatenate(list(positions.values())))
    cache_idx = val_idx[shown]
    preds = predict_masks(decoder, cache, cache_idx, batch_size=16, device=device, layers=layers, classes=classes)
    truths, previews = cache.masks(cache_idx), cache.previews(cache_idx)
    truths = truths.astype(bool) if classes.binary else truths
    features = cache.features(cache_idx, layers=layers)
    examples = {
        int(p): Example(cache.image_ids[i], cache.class_names[cache.class_index[i]], float(ious[p]), previews[k],
                        truths[k], preds[k], features[k])
        for k, (p, i) in enumerate(zip(shown, cache_idx))
    }
    galleries = {name: [examples[int(p)] for p in chosen] for name, chosen in positions.items()}
    fit_idx = np.random.default_rng(seed).choice(val_idx, min(PCA_IMAGES, len(val_idx)), replace=False)
    pca_sample = cache.features(np.sort(fit_idx), layers=layers).reshape(-1, features.shape[-1])
    return galleries, pca_sample


@dataclasses.dataclass
class Evaluation:
    """A run's best checkpoint scored on its validation images."""

    record: RunRecord
    decoder: torch.nn.Module
    val_ids: list[str]  # as split.json lists them
    val_idx: np.ndarray  # their cache indices
    classes: list[str]  # per validation image
    scores: dict[str, np.ndarray]  # per image at THRESHOLD: iou, dice, precision, recall, boundary_f
    metrics: dict[str, Any]  # what metrics.json holds
    layers: tuple[int, ...]  # the cached blocks the decoder reads
    pixel_classes: Classes = Classes()  # what the decoder's outputs mean
    class_ious: np.ndarray | None = None  # several classes: IoU per image and class (N×C; NaN: neither true nor
    # predicted in the image)


def evaluate_run(cache: FeatureCache, run_dir: Path, device: torch.device, *, batch_size: int = 16,
                 full: bool = True, source: ScoringSource | None = None) -> Evaluation:
    """Score ``run_dir``'s best checkpoint on its validation images from an open cache (refused when the run
    was trained on another cache). ``full`` adds the threshold sweep (binary runs) and the species probe; without
    them (cross-validation folds, sweeps) scoring costs a fraction. ``source``: where the features and masks are
    read (default the cache; a sweep passes the tensors it already holds on the device)."""
    run = RunFolder(run_dir)
    record, decoder, checkpoint = run.load()
    cache.require(record.cache, run_dir / RUN_FILE, run.split_digests())
    best = record.checkpoints["best"]
    cache.require({"fingerprint": checkpoint.cache_fingerprint}, run_dir / best.file)
    split = run.read_split(record)
    val_idx = cache.indices_of(split["val"], run_dir / SPLIT_FILE)
    pixel_classes = checkpoint.pixel_classes
    options = dict(batch_size=batch_size, device=device, layers=checkpoint.layers)
    source = cache if source is None else source
    scored = (_score_binary(decoder, source, val_idx, full=full, **options) if pixel_classes.binary else
              _score_classes(decoder, source, val_idx, classes=pixel_classes,
                             species=cache.config.mask_format == "species", **options))
    classes = [cache.class_names[k] for k in cache.class_index[val_idx]]
    metrics = {
        "run": str(run_dir.resolve()), "backbone": cache.backbone.name, "random_init": cache.backbone.random_init,
        "cache_fingerprint": cache.fingerprint, "checkpoint": best.file, "checkpoint_sha256": best.sha256,
        "epoch": checkpoint.epoch, "run_status": record.status, "epochs_done": record.epochs_done,
        "epochs_planned": record.epochs_planned, "threshold": THRESHOLD if pixel_classes.binary else None,
        "boundary_tolerance_px": BOUNDARY_TOLERANCE, "split": "val", "split_method": record.split["method"],
        "val_with_duplicate_in_train": record.split["val_with_duplicate_in_train"],
        **summarize_scores(scored.per_image, classes, split["val"]), **scored.dataset,
    }
    if full:
        metrics["species_probe"] = run_probe(cache, cache.indices_of(split["train"], run_dir / SPLIT_FILE), val_idx)
    return Evaluation(record, decoder, split["val"], val_idx, classes, scored.per_image, metrics, checkpoint.layers,
                      pixel_classes, scored.class_ious)


def write_scores(out_dir: Path, evaluation: Evaluation) -> None:
    """metrics.json and per_image.csv: what `compare` reads back instead of scoring the run again."""
    write_json(out_dir / METRICS_FILE, evaluation.metrics)
    _write_per_image(out_dir / PER_IMAGE_FILE, evaluation.val_ids, evaluation.classes, evaluation.scores,
                     _class_columns(evaluation))


def run_evaluation(cache_path: Path, run_dir: Path, out_dir: Path | None = None, *, batch_size: int = 16,
                   device: str = "auto", report: bool = True) -> dict[str, Any]:
    """Score the run's best checkpoint on its validation images; writes metrics.json, per_image.csv and
    (unless ``report`` is False) the figures and pages. Returns the metrics."""
    out_dir = out_dir or run_dir / REPORT_DIR
    torch_device = resolve_device(device)
    run = RunFolder(run_dir)
    record = run.read_record()  # a wrong --run is named before the cache is opened
    _check_report_folder(out_dir, run_dir)
    history = run.read_history(record) if report else None  # a lost history before an hour of scoring
    with FeatureCache(cache_path) as cache:
        evaluation = evaluate_run(cache, run_dir, torch_device, batch_size=batch_size, full=report)
        if report:
            galleries, pca_sample = _report_arrays(evaluation.decoder, cache, evaluation.val_idx,
                                                   evaluation.scores["iou"], evaluation.record.train_config.seed,
                                                   torch_device, evaluation.layers, evaluation.pixel_classes)
    make_output_dir(out_dir)
    write_scores(out_dir, evaluation)
    if report:
        write_report(out_dir, ReportData(evaluation.metrics, evaluation.record.to_json(), history,
                                         evaluation.scores["iou"], galleries, pca_sample, evaluation.pixel_classes))
    logger.info("wrote %s", out_dir)
    return evaluation.metrics


def _check_report_folder(out_dir: Path, run_dir: Path) -> None:
    """A report goes into its own folder: never into a run, cross-validation or sweep folder, nor into a folder
    holding other files (whose files it would mix with), nor into the report of another run (which it would
    replace). The run's own report (``RUN/report``, or one whose metrics.json names the run) is replaced."""
    RunFolder(out_dir).require_no_kind("report")
    if out_dir.resolve() == (run_dir / REPORT_DIR).resolve() or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not any((out_dir / name).is_file() for name in EVERY_REPORT_FILE):
        raise FishsegError(f"{out_dir}: not empty and not a report folder; pass an empty or new folder as `out`, "
                           f"or leave `out` out to write {run_dir / REPORT_DIR}")
    owner = _report_owner(out_dir)
    if owner is not None and owner != run_dir.resolve():
        raise FishsegError(f"{out_dir}: the report folder of another run ({owner}); pass another `out`, or leave "
                           f"`out` out to write {run_dir / REPORT_DIR}")


def _report_owner(out_dir: Path) -> Path | None:
    """The run a report folder describes: the one its metrics.json names, else (a report of an earlier version)
    the run folder it lies in as ``report/``; None when neither tells."""
    metrics = read_json(out_dir / METRICS_FILE) if (out_dir / METRICS_FILE).is_file() else {}
    recorded = metrics.get("run") if isinstance(metrics, dict) else None
    if isinstance(recorded, str):
        return Path(recorded)
    owner = out_dir.parent
    return owner.resolve() if out_dir.name == REPORT_DIR and RunFolder(owner).holds_run else None


def _class_columns(evaluation: Evaluation) -> dict[str, np.ndarray]:
    """per_image.csv's ``iou:<class>`` columns of a run with several classes (none for binary)."""
    if evaluation.class_ious is None:
        return {}
    return {f"iou:{name}": evaluation.class_ious[:, k] for k, name in enumerate(evaluation.pixel_classes.names)}


def _cell(value: float) -> str:
    """A score exactly as float64 (compare re-reads it); empty for NaN (a class neither true nor predicted)."""
    return "" if np.isnan(value) else repr(float(value))


def _write_per_image(path: Path, image_ids: list[str], classes: list[str], scores: dict[str, np.ndarray],
                     extra: dict[str, np.ndarray]) -> None:
    columns = {**scores, **extra}
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "class", *columns])
        for row in zip(image_ids, classes, *columns.values()):
            writer.writerow([row[0], row[1], *(_cell(value) for value in row[2:])])
