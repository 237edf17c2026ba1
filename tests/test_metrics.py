from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from fishseg.evaluation.metrics import (THRESHOLDS, batch_pooled_iou, binarize, boundary, boundary_f_per_image,
                                        dice_per_image, iou_per_image, pixel_counts, precision_per_image,
                                        recall_per_image, summarize, sweep_thresholds)


def test_hand_worked_example() -> None:
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]]], dtype=torch.bool)  # 2 pixels
    target = torch.tensor([[[0, 1, 1], [0, 0, 1]]], dtype=torch.bool)  # 3 pixels, 1 shared
    assert iou_per_image(pred, target).item() == pytest.approx(1 / 4)
    assert dice_per_image(pred, target).item() == pytest.approx(2 / 5)


def test_empty_prediction_and_truth_score_one_and_misses_score_zero() -> None:
    empty, full = torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)
    assert iou_per_image(empty, empty).item() == 1.0 and dice_per_image(empty, empty).item() == 1.0
    assert iou_per_image(empty, full).item() == 0.0 and dice_per_image(full, empty).item() == 0.0


def test_agrees_with_scikit_learn_per_image() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.random((5, 16, 16)) > 0.5, rng.random((5, 16, 16)) > 0.3
    ious = iou_per_image(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    dices = dice_per_image(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    for i in range(5):
        assert ious[i] == pytest.approx(jaccard_score(target[i].ravel(), pred[i].ravel()))
        assert dices[i] == pytest.approx(f1_score(target[i].ravel(), pred[i].ravel()))


def test_binarize_thresholds_the_probability() -> None:
    logits = torch.tensor([-1.0, -0.01, 0.01, 3.0])
    assert binarize(logits).tolist() == [False, False, True, True]
    assert binarize(logits, threshold=0.9).tolist() == [False, False, False, True]


def test_summarize() -> None:
    assert summarize(np.array([0.0, 0.5, 1.0, 0.5])) == {
        "mean": 0.5, "std": pytest.approx(np.sqrt(0.125)), "median": 0.5, "min": 0.0, "max": 1.0}


def test_threshold_sweep_matches_single_threshold_scores() -> None:
    rng = np.random.default_rng(1)
    logits, target = torch.from_numpy(rng.normal(size=(3, 8, 8))), torch.from_numpy(rng.random((3, 8, 8)) > 0.5)
    sweep = sweep_thresholds(torch.sigmoid(logits), target)
    assert sweep["iou"].shape == sweep["dice"].shape == (len(THRESHOLDS), 3)
    assert THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95
    for row, threshold in enumerate(THRESHOLDS):
        pred = binarize(logits, threshold)
        torch.testing.assert_close(sweep["iou"][row], iou_per_image(pred, target))
        torch.testing.assert_close(sweep["dice"][row], dice_per_image(pred, target))


def test_precision_and_recall_hand_worked_and_against_scikit_learn() -> None:
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]]], dtype=torch.bool)
    target = torch.tensor([[[0, 1, 1], [0, 0, 1]]], dtype=torch.bool)
    assert precision_per_image(pred, target).item() == pytest.approx(1 / 2)
    assert recall_per_image(pred, target).item() == pytest.approx(1 / 3)
    rng = np.random.default_rng(2)
    preds, targets = rng.random((4, 9, 9)) > 0.6, rng.random((4, 9, 9)) > 0.4
    preds[3] = False  # an empty prediction: precision 0, as zero_division=0
    for i, (p, t) in enumerate(zip(preds, targets)):
        p_t, t_t = torch.from_numpy(p[None]), torch.from_numpy(t[None])
        assert precision_per_image(p_t, t_t).item() == pytest.approx(precision_score(t.ravel(), p.ravel(), zero_division=0))
        assert recall_per_image(p_t, t_t).item() == pytest.approx(recall_score(t.ravel(), p.ravel(), zero_division=0))
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert precision_per_image(empty, empty).item() == recall_per_image(empty, empty).item() == 1.0


def test_boundary_of_a_square_is_its_outline() -> None:
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 1:6, 1:6] = True
    expected = mask.clone()
    expected[0, 2:5, 2:5] = False
    assert torch.equal(boundary(mask), expected)
    full = boundary(torch.ones(1, 3, 3, dtype=torch.bool))  # the image border counts as background
    assert full.sum() == 8 and not full[0, 1, 1]


def test_boundary_f_hand_worked() -> None:
    truth = torch.zeros(1, 20, 20, dtype=torch.bool)
    truth[0, 5:15, 5:15] = True  # outline of 36 pixels
    shifted = torch.roll(truth, shifts=3, dims=2)  # every edge moves 3 px sideways
    assert boundary_f_per_image(truth, truth).item() == 1.0
    assert boundary_f_per_image(shifted, truth, tolerance=3).item() == 1.0
    # tolerance 2, predicted outline (36 px) against the true one: top and bottom rows 9 of 10 each (the
    # outermost is 3 px away), left column 4 of 8 (the 2 nearest each true row), right column 0 of 8;
    # by symmetry the same 22 of 36 the other way, so F = 22/36
    assert boundary_f_per_image(shifted, truth, tolerance=2).item() == pytest.approx(22 / 36)
    empty = torch.zeros(1, 20, 20, dtype=torch.bool)
    assert boundary_f_per_image(empty, empty).item() == 1.0 and boundary_f_per_image(empty, truth).item() == 0.0


def test_pixel_counts_pool_over_images() -> None:
    pred = torch.tensor([[[1, 1], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.bool)
    target = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.bool)
    intersection, union = pixel_counts(pred, target)
    assert intersection.tolist() == [1, 1] and union.tolist() == [2, 4]
    assert (intersection.sum() / union.sum()).item() == pytest.approx(2 / 6)  # pooled, not the mean of 1/2 and 1/4


def test_reference_batch_iou_pools_pixels_within_each_batch_in_order() -> None:
    intersection, union = np.array([1, 9, 0, 0, 5]), np.array([2, 10, 0, 0, 10])
    # batches of 2: (1+9)/(2+10), both empty → 1, 5/10; the per-image mean would be (0.5+0.9+1+1+0.5)/5
    assert batch_pooled_iou(intersection, union, 2) == pytest.approx((10 / 12 + 1 + 0.5) / 3)
    assert batch_pooled_iou(intersection, union, 8) == pytest.approx(15 / 22)  # one batch: the pooled IoU
    assert batch_pooled_iou(intersection[::-1], union[::-1], 2) == pytest.approx((0.5 + 0.9 + 0.5) / 3)  # order matters
