from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score

from fishseg.metrics import THRESHOLDS, binarize, dice_per_image, iou_per_image, summarize, sweep_thresholds


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
