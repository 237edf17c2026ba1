"""Segmentation metrics, defined once for training, evaluation and reports.

All scores are per image (B×H×W boolean masks in, B scores out) and averaged over images by
the caller. An image whose prediction and truth are both empty scores 1: nothing to find,
nothing found.
"""

from __future__ import annotations

import numpy as np
import torch

THRESHOLD = 0.5  # on the sigmoid probability, as in the reference
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 … 0.95 for sweeps; includes THRESHOLD


def binarize(logits: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Logits → boolean foreground mask at a probability threshold."""
    return torch.sigmoid(logits) > threshold


def _counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    intersection = (pred & target).sum(1).double()
    return intersection, pred.sum(1).double(), target.sum(1).double()


def iou_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|P∩T| / |P∪T| per image (B), 1 where both are empty."""
    intersection, pred_area, target_area = _counts(pred, target)
    union = pred_area + target_area - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2|P∩T| / (|P|+|T|) per image (B), 1 where both are empty."""
    intersection, pred_area, target_area = _counts(pred, target)
    total = pred_area + target_area
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


def sweep_thresholds(probabilities: torch.Tensor, target: torch.Tensor,
                     thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, torch.Tensor]:
    """Per-image IoU and Dice at each threshold: ``{"iou": T×B, "dice": T×B}``."""
    target = target.bool()
    preds = [probabilities > threshold for threshold in thresholds]
    return {"iou": torch.stack([iou_per_image(pred, target) for pred in preds]),
            "dice": torch.stack([dice_per_image(pred, target) for pred in preds])}


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, std, median, min and max of per-image scores, as plain floats for JSON."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
    }
