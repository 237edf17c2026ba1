"""The several-class metrics of fishseg.evaluation.metrics against scikit-learn on random label maps."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, jaccard_score, precision_score, recall_score

from fishseg.evaluation.metrics import (boundary_f_per_image, class_boundary_f, class_dice, class_iou, class_precision,
                                        class_recall, confusion_matrices, dataset_mean_iou, mean_iou_per_image,
                                        normalized_confusion, pixel_accuracy, present_classes, species_accuracy)

CLASSES = 5  # class 4 never occurs: absent from truth and prediction


def _label_maps(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truth and prediction B×H×W in 0..3; in image 0 class 3 is neither true nor predicted."""
    rng = np.random.default_rng(seed)
    target, pred = rng.integers(0, 4, (6, 12, 12)), rng.integers(0, 4, (6, 12, 12))
    pred[pred == 3] = np.where(rng.random((pred == 3).sum()) > 0.5, 3, 1)  # class 3: predicted less than true
    target[0][target[0] == 3], pred[0][pred[0] == 3] = 2, 0
    return target, pred


def _confusion(target: np.ndarray, pred: np.ndarray) -> torch.Tensor:
    return confusion_matrices(torch.from_numpy(pred), torch.from_numpy(target), CLASSES)


def _sklearn(score: Callable[..., np.ndarray], target: np.ndarray, pred: np.ndarray, labels: list[int]) -> np.ndarray:
    return score(target.ravel(), pred.ravel(), labels=labels, average=None, zero_division=0)


def test_confusion_matrices_are_scikit_learns_image_by_image_and_pooled() -> None:
    target, pred = _label_maps()
    confusion = _confusion(target, pred)
    for image in range(len(target)):
        np.testing.assert_array_equal(confusion[image], confusion_matrix(target[image].ravel(), pred[image].ravel(),
                                                                         labels=range(CLASSES)))
    pooled = confusion_matrix(target.ravel(), pred.ravel(), labels=range(CLASSES))
    np.testing.assert_array_equal(confusion.sum(0), pooled)
    normalized = normalized_confusion(confusion.sum(0))
    np.testing.assert_allclose(normalized[:4], pooled[:4] / pooled[:4].sum(1, keepdims=True))
    assert normalized[4].tolist() == [0.0] * CLASSES  # no true pixel: a row of zeros
    assert pixel_accuracy(confusion) == pytest.approx((target == pred).mean())


@pytest.mark.parametrize("image", [None, 0, 1])  # the whole set pooled, an image lacking class 3, another image
def test_per_class_scores_are_scikit_learns(image: int | None) -> None:
    target, pred = _label_maps()
    if image is not None:
        target, pred = target[image:image + 1], pred[image:image + 1]
    confusion = _confusion(target, pred).sum(0)
    present = present_classes(confusion).numpy()
    labels = [k for k in range(CLASSES) if present[k]]
    assert labels == ([0, 1, 2] if image == 0 else [0, 1, 2, 3])
    for ours, theirs in ((class_iou, jaccard_score), (class_dice, f1_score), (class_precision, precision_score),
                         (class_recall, recall_score)):
        scores = ours(confusion).numpy()
        np.testing.assert_allclose(scores[present], _sklearn(theirs, target, pred, labels), err_msg=ours.__name__)
        assert (scores[~present] == 1).all()  # neither true nor predicted: nothing missed, nothing wrong


def test_the_two_mious_average_over_the_present_classes() -> None:
    target, pred = _label_maps()
    confusion = _confusion(target, pred)
    miou = dataset_mean_iou(confusion)
    assert miou == pytest.approx(jaccard_score(target.ravel(), pred.ravel(), labels=[0, 1, 2, 3], average="macro"))
    assert miou == dataset_mean_iou(confusion.sum(0)) == dataset_mean_iou(confusion.view(2, 3, CLASSES, CLASSES))
    per_image = [jaccard_score(t.ravel(), p.ravel(), labels=sorted(set(t.ravel()) | set(p.ravel())), average="macro")
                 for t, p in zip(target, pred)]
    np.testing.assert_allclose(mean_iou_per_image(confusion), per_image)


def test_one_class_everywhere_scores_one_and_a_total_miss_zero() -> None:
    zeros, ones = torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long)
    assert mean_iou_per_image(confusion_matrices(ones, ones, 3)).item() == 1.0
    assert dataset_mean_iou(confusion_matrices(zeros, ones, 3)) == 0.0


def test_boundary_f_per_class_is_the_binary_score_of_each_class() -> None:
    target, pred = (torch.from_numpy(maps) for maps in _label_maps(1))
    scores = class_boundary_f(pred, target, CLASSES)
    assert scores.shape == (6, CLASSES)
    for k in range(CLASSES):
        torch.testing.assert_close(scores[:, k], boundary_f_per_image(pred == k, target == k))
    assert (scores[:, 4] == 1).all() and scores[0, 3] == 1  # absent classes
    square = torch.zeros(1, 16, 16, dtype=torch.long)
    square[:, 4:12, 4:12] = 2
    assert class_boundary_f(square, square, 3)[0].tolist() == [1.0, 1.0, 1.0]


def test_species_accuracy_compares_the_dominant_non_background_classes() -> None:
    truth = torch.zeros(4, 8, 8, dtype=torch.long)
    truth[0, :4], truth[1, :4], truth[2, :4] = 1, 2, 2  # image 3 has no fish: not scored
    pred = truth.clone()
    pred[1, :3] = 1  # mostly the wrong species
    pred[2, :4], pred[2, 0, 0] = 0, 2  # one pixel of the right species, the rest background: right
    assert species_accuracy(confusion_matrices(pred, truth, 3)) == pytest.approx(2 / 3)
    pred[0] = 0  # no fish predicted: wrong
    assert species_accuracy(confusion_matrices(pred, truth, 3)) == pytest.approx(1 / 3)
