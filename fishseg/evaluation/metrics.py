"""Segmentation metrics, defined once for training, evaluation and reports.

All scores are per image (B×H×W boolean masks in, B scores out) and averaged over images by
the caller. An image whose prediction and truth are both empty scores 1: nothing to find,
nothing found. Otherwise an empty prediction has precision 0 and an empty truth recall 0 (as
scikit-learn's ``zero_division=0``).

With several classes every score starts from confusion matrices (rows: true class, columns: predicted
class, as scikit-learn's ``confusion_matrix``): per image B×C×C, summed over images for the dataset. Per
class: IoU, Dice, precision, recall as above, a class being "prediction" and "truth" one-hot. Two mIoUs:
``dataset_mean_iou`` (the standard: per-class IoU over all pixels of the split, then averaged) and
``mean_iou_per_image`` (each image's mIoU, averaged over images by the caller); both average over the
classes present (in truth or prediction) of what they cover, since a class absent from both says nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.5  # on the sigmoid probability, as in the reference
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 … 0.95 for sweeps; includes THRESHOLD
BOUNDARY_TOLERANCE = 2  # pixels at the mask size, for the boundary F-score
REFERENCE_BATCH = 8  # the reference notebook's validation batch size


def binarize(logits: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Logits → boolean foreground mask at a probability threshold, compared as the logit of the threshold
    (at 0.5: ``logits > 0``), with no sigmoid computed."""
    return logits > math.log(threshold / (1 - threshold))


def _counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    intersection = (pred & target).sum(1).double()
    return intersection, pred.sum(1).double(), target.sum(1).double()


def _iou(intersection: torch.Tensor, pred_area: torch.Tensor, target_area: torch.Tensor) -> torch.Tensor:
    """|P∩T| / |P∪T| from pixel counts (any broadcastable shapes), 1 where both are empty."""
    union = pred_area + target_area - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def _dice(intersection: torch.Tensor, pred_area: torch.Tensor, target_area: torch.Tensor) -> torch.Tensor:
    """2|P∩T| / (|P|+|T|) from pixel counts (any broadcastable shapes), 1 where both are empty."""
    total = pred_area + target_area
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


def iou_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|P∩T| / |P∪T| per image (B), 1 where both are empty."""
    return _iou(*_counts(pred, target))


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2|P∩T| / (|P|+|T|) per image (B), 1 where both are empty."""
    return _dice(*_counts(pred, target))


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, both_empty: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 1 where prediction and truth are both empty, 0 for other empty denominators."""
    ratio = numerator / denominator.clamp(min=1)
    return torch.where(both_empty, torch.ones_like(ratio), torch.where(denominator > 0, ratio, torch.zeros_like(ratio)))


def precision_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|P∩T| / |P| per image (B)."""
    intersection, pred_area, target_area = _counts(pred, target)
    return _ratio(intersection, pred_area, (pred_area == 0) & (target_area == 0))


def recall_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|P∩T| / |T| per image (B)."""
    intersection, pred_area, target_area = _counts(pred, target)
    return _ratio(intersection, target_area, (pred_area == 0) & (target_area == 0))


def boundary(mask: torch.Tensor) -> torch.Tensor:
    """Foreground pixels with any of their 8 neighbours in the background (outside the image counts as
    background): the mask minus its 3×3 erosion."""
    padded = F.pad(mask.float()[:, None], (1, 1, 1, 1))
    eroded = -F.max_pool2d(-padded, 3, stride=1)[:, 0]
    return mask.bool() & (eroded < 0.5)


def _within(points: torch.Tensor, reference: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Pixels of ``points`` within ``tolerance`` pixels (Euclidean) of a pixel of ``reference``."""
    offsets = torch.arange(-tolerance, tolerance + 1, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= tolerance ** 2).float()[None, None]
    near = F.conv2d(reference.float()[:, None], disk.to(reference.device), padding=tolerance)[:, 0] > 0
    return points & near


def boundary_f_per_image(pred: torch.Tensor, target: torch.Tensor, tolerance: int = BOUNDARY_TOLERANCE) -> torch.Tensor:
    """Boundary F-score per image (B): harmonic mean of the fractions of predicted boundary pixels within
    ``tolerance`` pixels of the true boundary and of true boundary pixels within it of the predicted one."""
    pred_edge, target_edge = boundary(pred), boundary(target)
    pred_count, target_count = pred_edge.flatten(1).sum(1).double(), target_edge.flatten(1).sum(1).double()
    both_empty = (pred_count == 0) & (target_count == 0)
    precision = _ratio(_within(pred_edge, target_edge, tolerance).flatten(1).sum(1).double(), pred_count, both_empty)
    recall = _ratio(_within(target_edge, pred_edge, tolerance).flatten(1).sum(1).double(), target_count, both_empty)
    return torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                       torch.zeros_like(precision))


def confusion_matrices(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image confusion matrices B×C×C (int64) of class-index maps B×H×W: entry [b, t, p] counts image b's
    pixels of true class t predicted as p."""
    pred, target = pred.long().flatten(1), target.long().flatten(1)
    rows = torch.arange(len(pred), device=pred.device)[:, None] * num_classes * num_classes
    cells = (rows + target * num_classes + pred).flatten()
    counts = torch.bincount(cells, minlength=len(pred) * num_classes * num_classes)
    return counts.view(len(pred), num_classes, num_classes)


def class_counts(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersection, predicted area and true area of each class (…×C, float64) from confusion matrices …×C×C."""
    confusion = confusion.double()
    return confusion.diagonal(dim1=-2, dim2=-1), confusion.sum(-2), confusion.sum(-1)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of each class (…×C) from confusion matrices …×C×C; 1 where the class is neither true nor predicted."""
    return _iou(*class_counts(confusion))


def class_dice(confusion: torch.Tensor) -> torch.Tensor:
    """Dice of each class (…×C) from confusion matrices …×C×C; 1 where the class is neither true nor
    predicted."""
    return _dice(*class_counts(confusion))


def class_precision(confusion: torch.Tensor) -> torch.Tensor:
    """Precision of each class (…×C): its correctly predicted pixels over its predicted pixels; 1 where the class is
    neither true nor predicted, 0 where it is true but never predicted."""
    intersection, pred_area, target_area = class_counts(confusion)
    return _ratio(intersection, pred_area, (pred_area == 0) & (target_area == 0))


def class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class (…×C): its correctly predicted pixels over its true pixels; 1 where the class is
    neither true nor predicted, 0 where it is predicted but never true."""
    intersection, pred_area, target_area = class_counts(confusion)
    return _ratio(intersection, target_area, (pred_area == 0) & (target_area == 0))


def class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """IoU, Dice, precision and recall of each class (…×C each, by metrics.json's names) from confusion matrices
    …×C×C: per image from per-image matrices, over a split from their sum."""
    return {"iou": class_iou(confusion), "dice": class_dice(confusion), "precision": class_precision(confusion),
            "recall": class_recall(confusion)}


def present_classes(confusion: torch.Tensor) -> torch.Tensor:
    """Boolean …×C: the classes true or predicted somewhere in each confusion matrix …×C×C."""
    _, pred_area, target_area = class_counts(confusion)
    return (pred_area + target_area) > 0


def mean_over_present(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of per-class ``scores`` …×C over the ``present`` classes (…×C boolean): a class absent from both
    truth and prediction says nothing, so it is left out (all absent: 0)."""
    return (scores * present).sum(-1) / present.sum(-1).clamp(min=1)


def mean_iou_per_image(confusion: torch.Tensor) -> torch.Tensor:
    """Per-image mIoU (B) from B×C×C: the mean IoU over the classes present in the image's truth or prediction.
    Its mean over images is metrics.json's ``miou_per_image`` (every image weighs alike)."""
    return mean_over_present(class_iou(confusion), present_classes(confusion))


def dataset_mean_iou(confusion: torch.Tensor) -> float:
    """Dataset mIoU, the standard one (metrics.json's ``miou``): confusion matrices …×C×C (per image, per batch,
    or already summed) are summed into one, each class's IoU is taken over all those pixels, and the IoUs are
    averaged over the classes present in truth or prediction. Large regions weigh more than in the per-image
    mean. A trainer sums ``confusion_matrices(...).sum(0)`` over its batches and calls this once."""
    return float(mean_iou_per_image(confusion.reshape(-1, *confusion.shape[-2:]).sum(0, keepdim=True))[0])


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of all pixels of the confusion matrices …×C×C whose predicted class is the true one."""
    pooled = confusion.reshape(-1, *confusion.shape[-2:]).sum(0).double()
    return float(pooled.trace() / pooled.sum().clamp(min=1))


def normalized_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Row-normalised C×C (float64) of a C×C confusion matrix: row t is where the pixels of true class t went
    (sums to 1; all zeros for a class with no true pixels)."""
    confusion = confusion.double()
    return confusion / confusion.sum(-1, keepdim=True).clamp(min=1)


def class_boundary_f(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     tolerance: int = BOUNDARY_TOLERANCE) -> torch.Tensor:
    """Boundary F-score of each class per image (B×C) from class-index maps B×H×W: ``boundary_f_per_image`` of
    the class's one-hot masks (1 where the class is neither true nor predicted in the image)."""
    return torch.stack([boundary_f_per_image(pred == k, target == k, tolerance) for k in range(num_classes)], -1)


def dominant_class(areas: torch.Tensor) -> torch.Tensor:
    """Per image (…), the non-background class (index ≥ 1) with the most pixels in ``areas`` …×C (int64); -1
    where there is no non-background pixel."""
    foreground = areas[..., 1:]
    return torch.where(foreground.sum(-1) > 0, foreground.argmax(-1) + 1, -1)


def species_accuracy(confusion: torch.Tensor) -> float:
    """Species accuracy of the pixel labels from per-image confusion matrices B×C×C, for masks whose fish pixels
    are all the image's species (``extract --classes species``): the fraction of images, among those with fish
    pixels, whose dominant predicted non-background class is the dominant true one (no fish predicted: wrong)."""
    _, pred_area, target_area = class_counts(confusion)
    truth = dominant_class(target_area)
    scored = truth >= 0
    return float((dominant_class(pred_area)[scored] == truth[scored]).double().mean()) if scored.any() else float("nan")


def pixel_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union pixel counts per image, to pool over a dataset: pooled IoU = Σ|P∩T| / Σ|P∪T|."""
    intersection, pred_area, target_area = _counts(pred, target)
    return intersection, pred_area + target_area - intersection


def batch_pooled_iou(intersection: np.ndarray, union: np.ndarray, batch_size: int = REFERENCE_BATCH) -> float:
    """The reference notebook's "val IoU": over consecutive batches of ``batch_size`` images (loader order), the
    mean of each batch's IoU with all its pixels pooled; a batch with nothing predicted and nothing true scores 1."""
    starts = range(0, len(intersection), batch_size)
    pooled = [(intersection[s:s + batch_size].sum(), union[s:s + batch_size].sum()) for s in starts]
    return float(np.mean([inter / total if total > 0 else 1.0 for inter, total in pooled]))


def _exceeding(histogram: torch.Tensor) -> torch.Tensor:
    """B×(T+1) bucket counts → T×B counts of pixels above each threshold (bucket > j)."""
    return histogram.flip(1).cumsum(1).flip(1)[:, 1:].T.double()


def sweep_thresholds(probabilities: torch.Tensor, target: torch.Tensor,
                     thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, torch.Tensor]:
    """Per-image IoU and Dice at each threshold: ``{"iou": T×B, "dice": T×B}``.

    One pass over the pixels for all thresholds: each pixel's bucket (how many thresholds its probability
    exceeds) is counted per image, and the areas above each threshold are suffix sums of those counts, the
    same integers as comparing ``probabilities > threshold`` once per threshold."""
    target = target.bool().flatten(1)
    edges = torch.tensor(thresholds, dtype=probabilities.dtype, device=probabilities.device)
    buckets = torch.bucketize(probabilities.flatten(1).contiguous(), edges)  # B×N in 0..T: thresholds exceeded
    width = len(thresholds) + 1
    rows = torch.arange(len(buckets), device=buckets.device)[:, None] * width
    pred_hist = torch.bincount((buckets + rows).flatten(), minlength=len(buckets) * width).view(-1, width)
    hit_hist = torch.bincount((buckets + rows)[target], minlength=len(buckets) * width).view(-1, width)
    pred_area, intersection = _exceeding(pred_hist), _exceeding(hit_hist)
    target_area = target.sum(1).double()[None]
    return {"iou": _iou(intersection, pred_area, target_area), "dice": _dice(intersection, pred_area, target_area)}


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
