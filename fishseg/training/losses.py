"""Training losses, per image (B values for a batch of B): binary (one logit per pixel) and several classes
(one logit per class and pixel), and the class weights a cache's pixel counts give.

Per image, so that history.json can keep each image's loss and a batch's loss is their mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fishseg.classes import Classes

__all__ = ["balanced_weights", "class_losses", "default_loss", "image_losses"]

SMOOTHING = 1.0  # added to the numerator and denominator of soft Dice: an absent class predicted absent scores 1


def default_loss(classes: Classes) -> str:
    """The loss a run trains with unless told otherwise: the reference's BCE for binary, cross-entropy with
    several classes."""
    return "bce" if classes.binary else "ce"


def _soft_dice(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smoothed soft Dice of probabilities and 0/1 targets over the last two (pixel) dimensions."""
    intersection = (probabilities * target).sum((-2, -1))
    total = probabilities.sum((-2, -1)) + target.sum((-2, -1))
    return (2 * intersection + SMOOTHING) / (total + SMOOTHING)


def image_losses(logits: torch.Tensor, target: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """Per-image loss (B) of binary logits and 0/1 targets (B×S×S): BCE, soft Dice (1 − Dice of the
    probabilities, +1 smoothing) or their sum."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
    if loss == "bce":
        return bce
    dice = 1 - _soft_dice(torch.sigmoid(logits), target)
    return dice if loss == "dice" else bce + dice


def class_losses(logits: torch.Tensor, target: torch.Tensor, loss: str = "ce",
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image loss (B) of logits B×C×S×S and class indices B×S×S: cross-entropy (each image's mean over its
    pixels, weighted as F.cross_entropy weighs them: Σ w·ce / Σ w), multi-class soft Dice (1 − the mean over
    classes of each class's soft Dice of the softmax, +1 smoothing; weighted mean over classes with ``weights``)
    or their sum. ``weights``: C per-class weights (None: all 1)."""
    target = target.long()
    if weights is not None:
        weights = weights.to(logits.device, logits.dtype)
    if loss in ("ce", "ce+dice"):
        pixels = F.cross_entropy(logits, target, reduction="none")
        if weights is None:
            ce = pixels.mean((1, 2))
        else:
            pixel_weights = weights[target]
            ce = (pixels * pixel_weights).sum((1, 2)) / pixel_weights.sum((1, 2)).clamp(min=1e-12)
        if loss == "ce":
            return ce
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    per_class = _soft_dice(torch.softmax(logits, 1), one_hot)  # B×C
    mean = per_class.mean(1) if weights is None else (per_class * weights).sum(1) / weights.sum()
    return 1 - mean if loss == "dice" else ce + 1 - mean


def balanced_weights(class_pixels: np.ndarray) -> np.ndarray:
    """Inverse pixel frequency (float32, C): w_c = N / (C' · n_c) over the C' classes with pixels in the cache
    (N their pixels in all, n_c those of class c; a class of average frequency weighs 1), 0 for a class with none."""
    counts = np.asarray(class_pixels, np.float64)
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)
