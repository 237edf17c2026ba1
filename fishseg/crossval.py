"""K-fold cross-validation over a cache: cheap, because every epoch runs from the cache."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fishseg import distributed
from fishseg.config import TrainConfig
from fishseg.evaluate import run_evaluation
from fishseg.runtime import resolve_device, write_json
from fishseg.train import run_training

logger = logging.getLogger(__name__)

CV_FILE = "cv.json"
CV_METRICS = ("mean_iou", "mean_dice", "mean_boundary_f", "pooled_iou")


def run_cross_validation(cache_path: Path, out_dir: Path, config: TrainConfig, folds: int, *, device: str = "auto",
                         stream: bool | None = None) -> dict[str, Any]:
    """Train and score one run per fold in ``out_dir/fold-k``; writes ``cv.json`` with mean ± std over folds.

    Under torchrun every fold trains on all ranks; rank 0 alone scores the folds and writes cv.json.
    """
    results = []
    with distributed.session(resolve_device(device)) as (ranks, _):
        for fold in range(folds):
            run_dir = out_dir / f"fold-{fold + 1}"
            if ranks.main:
                logger.info("fold %d of %d", fold + 1, folds)
            run_training(cache_path, run_dir, dataclasses.replace(config, folds=folds, fold=fold), device=device,
                         stream=stream)
            if ranks.main:
                results.append(_score_fold(cache_path, run_dir, fold, device))
        if not ranks.main:
            return {}
    summary = {}
    for name in CV_METRICS:
        values = [result[name] for result in results]
        summary[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    cv = {"train_config": dataclasses.asdict(dataclasses.replace(config, folds=folds)), "folds": results,
          "summary": summary}
    write_json(out_dir / CV_FILE, cv)
    return cv


def _score_fold(cache_path: Path, run_dir: Path, fold: int, device: str) -> dict[str, Any]:
    metrics = run_evaluation(cache_path, run_dir, run_dir / "report", device=device, report=False)
    return {"fold": fold + 1, "n_images": metrics["n_images"],
            "val_with_duplicate_in_train": metrics["val_with_duplicate_in_train"],
            **{name: metrics[name] for name in CV_METRICS}}
