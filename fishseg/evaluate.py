"""Stage 3: score a run's checkpoint on its validation split, from the cache alone."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fishseg.cache import FeatureCache
from fishseg.decoders import load_checkpoint, segment
from fishseg.metrics import THRESHOLD, binarize, dice_per_image, iou_per_image, summarize
from fishseg.report import write_report
from fishseg.runtime import atomic_path, autocast, read_json, resolve_device, write_json
from fishseg.train import BEST_CHECKPOINT, HISTORY_FILE, RUN_FILE, SPLIT_FILE

logger = logging.getLogger(__name__)

METRICS_FILE, PER_IMAGE_FILE = "metrics.json", "per_image.csv"


@torch.inference_mode()
def score_images(decoder: torch.nn.Module, cache: FeatureCache, indices: np.ndarray, *, batch_size: int,
                 device: torch.device) -> dict[str, np.ndarray]:
    """Per-image IoU and Dice (threshold 0.5) of ``decoder`` on the cached images ``indices``."""
    decoder.eval().to(device)
    scores: dict[str, list[np.ndarray]] = {"iou": [], "dice": []}
    for batch in np.array_split(indices, max(1, -(-len(indices) // batch_size))):
        target = torch.from_numpy(cache.masks(batch)).to(device).bool()
        with autocast(device):
            logits = segment(decoder, torch.from_numpy(cache.features(batch)).to(device), target.shape[-1])
        pred = binarize(logits.float())
        scores["iou"].append(iou_per_image(pred, target).cpu().numpy())
        scores["dice"].append(dice_per_image(pred, target).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in scores.items()}


def summarize_scores(scores: dict[str, np.ndarray], class_index: np.ndarray,
                     class_names: list[str]) -> dict[str, Any]:
    """Dataset means/medians and per-class means of per-image scores."""
    per_class = {}
    for k, name in enumerate(class_names):
        members = class_index == k
        if members.any():
            per_class[name] = {"n_images": int(members.sum()),
                               **{f"mean_{m}": float(v[members].mean()) for m, v in scores.items()}}
    iou, dice = summarize(scores["iou"]), summarize(scores["dice"])
    return {"n_images": len(class_index), "mean_iou": iou["mean"], "mean_dice": dice["mean"],
            "median_iou": iou["median"], "median_dice": dice["median"], "iou": iou, "dice": dice,
            "per_class": per_class}


def run_evaluation(cache_path: Path, run_dir: Path, out_dir: Path | None = None, *, batch_size: int = 16,
                   device: str = "auto") -> dict[str, Any]:
    """Score the run's best checkpoint on its validation images; writes metrics.json and the report."""
    out_dir = out_dir or run_dir / "report"
    run = read_json(run_dir / RUN_FILE)
    decoder, checkpoint = load_checkpoint(run_dir / BEST_CHECKPOINT)
    with FeatureCache(cache_path) as cache:
        cache.require(run["cache"]["fingerprint"], run_dir / RUN_FILE)
        cache.require(checkpoint["cache_fingerprint"], run_dir / BEST_CHECKPOINT)
        val_ids = read_json(run_dir / SPLIT_FILE)["val"]
        val_idx = cache.indices_of(val_ids, run_dir / SPLIT_FILE)
        scores = score_images(decoder, cache, val_idx, batch_size=batch_size, device=resolve_device(device))
        class_index, class_names = cache.class_index[val_idx], cache.class_names
        metrics = {
            "backbone": cache.backbone.name, "random_init": cache.backbone.random_init,
            "cache_fingerprint": cache.fingerprint, "checkpoint": BEST_CHECKPOINT,
            "epoch": checkpoint["epoch"], "threshold": THRESHOLD, "split": "val",
            **summarize_scores(scores, class_index, class_names),
        }
    write_json(out_dir / METRICS_FILE, metrics)
    _write_per_image(out_dir / PER_IMAGE_FILE, val_ids, [class_names[k] for k in class_index], scores)
    write_report(out_dir, metrics, run, read_json(run_dir / HISTORY_FILE))
    logger.info("wrote %s", out_dir)
    return metrics


def _write_per_image(path: Path, image_ids: list[str], classes: list[str], scores: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "class", *scores])
        for row in zip(image_ids, classes, *scores.values()):
            writer.writerow([row[0], row[1], *(f"{value:.6f}" for value in row[2:])])
