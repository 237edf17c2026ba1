"""K-fold cross-validation over a cache: cheap, because every epoch runs from the cache.

The folder (``cv.json`` and one run folder per fold) is defined in ``fishseg.formats.runs``. Like a run, a
cross-validation is never replaced without ``overwrite`` and resumes fold by fold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fishseg import distributed
from fishseg.config import TrainConfig
from fishseg.distributed import Ranks
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import evaluate_run, write_scores
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import (CV_KIND, FINISHED, REPORT_DIR, CrossValidationRecord, RunFolder, check_resume_flags,
                                  differing_fields)
from fishseg.models.decoders import uses_image
from fishseg.runtime import resolve_device
from fishseg.training.train import EpochCallback, TrainingData, plan_run, train_run

logger = logging.getLogger(__name__)

CV_METRICS = ("mean_iou", "mean_dice", "mean_boundary_f", "pooled_iou")
CLASS_IOU = "iou:"  # with several pixel classes, a fold's IoU of class NAME is "iou:NAME" (per_image.csv's column)


def plan_cross_validation(out_dir: Path, config: TrainConfig, cache: FeatureCache, *, resume: bool,
                          overwrite: bool) -> None:
    """Refuse, changing nothing, what would lose or mix cross-validations, and whatever a fold's run would refuse
    (its split, the cache, the run there), so that nothing is written for a cross-validation that cannot run."""
    check_resume_flags(resume, overwrite)
    folder = RunFolder(out_dir)
    folder.require_kind(CV_KIND)
    if folder.holds_cv and folder.locked:
        raise FishsegError(f"{out_dir}: another process is cross-validating into this folder; wait for it or "
                           f"stop it")
    if not folder.holds_cv and resume:
        raise FishsegError(f"{out_dir}: holds no cross-validation to resume; leave `resume=True` out to start one")
    if folder.holds_cv and not overwrite:
        _check_recorded(folder, config, resume)
    for fold in range(config.folds):
        run = folder.fold(fold)
        plan_run(run.path, dataclasses.replace(config, fold=fold), cache, resume=resume and run.holds_run,
                 overwrite=overwrite)


def _check_recorded(folder: RunFolder, config: TrainConfig, resume: bool) -> None:
    """Refuse to start over the cross-validation recorded in ``out_dir`` (described as it is recorded), or to
    resume it with other settings."""
    cv = folder.read_cv()
    recorded = cv.train_config
    if not resume:
        raise FishsegError(f"{folder}: already holds a {recorded.folds}-fold cross-validation ({cv.status}, "
                           f"{cv.scored} of {recorded.folds} folds scored); pass `resume=True` to continue it or "
                           f"`overwrite=True` to replace it")
    differing = differing_fields(recorded, config)
    if differing:
        raise FishsegError(f"{folder}: the cross-validation was run with other settings ({'; '.join(differing)}); "
                           f"resume with its settings, or pass another `out`")


def run_cross_validation(cache_path: Path, out_dir: Path, config: TrainConfig, *, device: str = "auto",
                         stream: bool | None = None, resume: bool = False, overwrite: bool = False,
                         compiled: bool = False) -> CrossValidationRecord:
    """Train and score one run per fold of ``config.folds`` in ``out_dir/fold-k``; writes ``cv.json`` with
    mean ± std over folds. Under torchrun every fold trains on all ranks; rank 0 alone scores the folds and
    writes cv.json, and every rank returns what it wrote."""
    with distributed.session(resolve_device(device)) as (ranks, torch_device), FeatureCache(cache_path) as cache:
        plan_cross_validation(out_dir, config, cache, resume=resume, overwrite=overwrite)
        data = TrainingData.open(cache, stream, ranks.local, guides=uses_image(config.decoder), device=torch_device)
        return cross_validate(data, out_dir, config, ranks=ranks, device=torch_device, resume=resume,
                              overwrite=overwrite, compiled=compiled)


def cross_validate(data: TrainingData, out_dir: Path, config: TrainConfig, *, ranks: Ranks = Ranks(),
                   device: torch.device = torch.device("cpu"), resume: bool = False, overwrite: bool = False,
                   on_epoch: EpochCallback | None = None, compiled: bool = False) -> CrossValidationRecord:
    """Cross-validate from already opened data (a sweep shares it between configs). The folder is locked while
    it runs; stopped before any fold kept an epoch, it is left as it was before (cv.json removed, and the folder
    when this call created it)."""
    plan_cross_validation(out_dir, config, data.cache, resume=resume, overwrite=overwrite)
    folder = RunFolder(out_dir)
    created = not out_dir.exists()
    ranks.barrier()  # every rank has read the folder before rank 0 writes into it
    with folder.lock() if ranks.main else contextlib.nullcontext():
        if overwrite and ranks.main:
            if folder.holds_cv:
                logger.info("%s: replacing the cross-validation there (`overwrite=True`)", out_dir)
            for fold in range(config.folds):
                folder.fold(fold).clear()
            folder.clear()
        try:
            return _cross_validate(data, folder, config, ranks, device, resume, on_epoch, compiled)
        except (KeyboardInterrupt, FishsegError):
            if ranks.main and not any(folder.fold(fold).holds_run for fold in range(config.folds)):
                folder.clear()
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise


def _cross_validate(data: TrainingData, folder: RunFolder, config: TrainConfig, ranks: Ranks, device: torch.device,
                    resume: bool, on_epoch: EpochCallback | None, compiled: bool) -> CrossValidationRecord:
    cv = CrossValidationRecord.start(config)
    for fold in range(config.folds):
        run = folder.fold(fold)
        if ranks.main:
            folder.write_cv(cv)
            logger.info("fold %d of %d", fold + 1, config.folds)
        train_run(data, run.path, dataclasses.replace(config, fold=fold), ranks=ranks, device=device,
                  resume=resume and run.holds_run, on_epoch=on_epoch, compiled=compiled)
        if ranks.main:
            cv = cv.with_fold(fold, _score_fold(data, run, fold, device))
    if ranks.main:
        cv = dataclasses.replace(cv, status=FINISHED, summary=_summary(cv.folds))
        folder.write_cv(cv)
    return ranks.gather(cv)[0]  # rank 0's, which scored the folds, on every rank


def _summary(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and std over the folds of each of CV_METRICS and, with several pixel classes, of each class's IoU
    (``iou:<class>``, over the folds that scored the class)."""
    summary = {}
    names = dict.fromkeys(name for result in results for name in result if name.startswith(CLASS_IOU))
    for name in (*CV_METRICS, *names):
        values = [result[name] for result in results if result.get(name) is not None]
        if values:
            summary[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return summary


def _score_fold(data: TrainingData, run: RunFolder, fold: int, device: torch.device) -> dict[str, Any]:
    evaluation = evaluate_run(data.cache, run.path, device, full=False, source=data.scoring_source())
    write_scores(run.path / REPORT_DIR, evaluation)
    metrics = evaluation.metrics
    per_class = metrics.get("pixel_classes", {}).get("per_class", {})
    return {"fold": fold + 1, "n_images": metrics["n_images"],
            "val_with_duplicate_in_train": metrics["val_with_duplicate_in_train"],
            **{name: metrics[name] for name in CV_METRICS},
            **{f"{CLASS_IOU}{name}": scores["iou"] for name, scores in per_class.items()}}
