"""Stage 2: train a decoder from the cache alone (no image decoding, no backbone).

A run directory holds ``run.json`` (config, cache fingerprint, backbone, best epoch),
``split.json`` (train/val image ids), ``history.json`` (per-iteration and per-epoch loss and IoU)
and the ``best``/``last`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fishseg import __version__
from fishseg.cache import FeatureCache
from fishseg.config import TrainConfig
from fishseg.data import random_split
from fishseg.decoders import build_decoder, save_checkpoint, segment
from fishseg.errors import FishsegError
from fishseg.metrics import binarize, iou_per_image
from fishseg.runtime import atomic_path, autocast, resolve_device, write_json

logger = logging.getLogger(__name__)

RUN_FILE, SPLIT_FILE, HISTORY_FILE = "run.json", "split.json", "history.json"
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.safetensors", "last.safetensors"
TABLE_HEADER = f"{'epoch':>5} {'train loss':>10} {'train IoU':>9} {'val loss':>9} {'val IoU':>8} {'time':>6}"


@dataclasses.dataclass
class EpochResult:
    """Per-image and per-iteration values of one pass over a split."""

    image_losses: np.ndarray
    image_ious: np.ndarray
    iteration_losses: list[float]
    iteration_ious: list[float]


def run_epoch(decoder: nn.Module, features: torch.Tensor, masks: torch.Tensor, batch_size: int,
              device: torch.device, optimizer: torch.optim.Optimizer | None = None,
              generator: torch.Generator | None = None) -> EpochResult:
    """One pass over cached ``features`` (N×h×w×D) and ``masks`` (N×S×S); trains when given an optimizer."""
    training = optimizer is not None
    decoder.train(training)
    order = torch.randperm(len(features), generator=generator) if training else torch.arange(len(features))
    result = EpochResult([], [], [], [])
    for batch in order.split(batch_size):
        target = masks[batch].to(device, non_blocking=True).float()
        with torch.set_grad_enabled(training), autocast(device):
            logits = segment(decoder, features[batch].to(device, non_blocking=True), target.shape[-1])
        losses = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean((1, 2))
        if not torch.isfinite(losses).all():
            raise FishsegError("loss is NaN or infinite; lower --lr (the last good checkpoint is kept)")
        if training:
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
        losses, ious = losses.detach(), iou_per_image(binarize(logits.detach()), target.bool())
        result.image_losses.append(losses.cpu().numpy())
        result.image_ious.append(ious.cpu().numpy())
        result.iteration_losses.append(float(losses.mean()))
        result.iteration_ious.append(float(ious.mean()))
    result.image_losses = np.concatenate(result.image_losses)
    result.image_ious = np.concatenate(result.image_ious)
    return result


def epoch_summary(epoch: int, train: EpochResult, val: EpochResult, seconds: float) -> dict[str, float]:
    """Means and standard deviations over images of one epoch, for history.json and the report."""
    row: dict[str, float] = {"epoch": epoch}
    for split, result in (("train", train), ("val", val)):
        row.update({
            f"{split}_loss": float(result.image_losses.mean()), f"{split}_loss_std": float(result.image_losses.std()),
            f"{split}_iou": float(result.image_ious.mean()), f"{split}_iou_std": float(result.image_ious.std()),
        })
    row["seconds"] = seconds
    return row


def _iterations(epoch: int, result: EpochResult) -> list[dict[str, float]]:
    return [{"epoch": epoch, "step": step, "loss": loss, "iou": iou}
            for step, (loss, iou) in enumerate(zip(result.iteration_losses, result.iteration_ious), start=1)]


def _load_split(cache: FeatureCache, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(cache.features(indices)), torch.from_numpy(cache.masks(indices))


def run_training(cache_path: Path, out_dir: Path, config: TrainConfig, *, device: str = "auto") -> dict[str, Any]:
    """Train ``config.decoder`` on the cache's train split; returns the contents of run.json."""
    torch_device = resolve_device(device)
    with FeatureCache(cache_path) as cache:
        train_idx, val_idx = random_split(len(cache), config.val_fraction, config.seed)
        train_x, train_y = _load_split(cache, train_idx)
        val_x, val_y = _load_split(cache, val_idx)
        run = {
            "fishseg_version": __version__,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "train_config": dataclasses.asdict(config),
            "cache": {"path": str(cache_path), "fingerprint": cache.fingerprint},
            "backbone": dataclasses.asdict(cache.backbone),
            "split": {"method": "random", "n_train": len(train_idx), "n_val": len(val_idx)},
            "device": str(torch_device),
        }
        write_json(out_dir / SPLIT_FILE, {"train": [cache.image_ids[i] for i in train_idx],
                                          "val": [cache.image_ids[i] for i in val_idx]})
    torch.manual_seed(config.seed)
    decoder = build_decoder(config.decoder, int(train_x.shape[-1])).to(torch_device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    meta = {"decoder": config.decoder, "in_dim": int(train_x.shape[-1]), "train_config": run["train_config"],
            "cache_fingerprint": run["cache"]["fingerprint"]}
    history: dict[str, Any] = {"iterations": {"train": [], "val": []}, "epochs": []}
    best_iou = -1.0
    logger.info("training %s on %d images, validating on %d (%s)", config.decoder, len(train_x), len(val_x),
                torch_device)
    logger.info(TABLE_HEADER)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train = run_epoch(decoder, train_x, train_y, config.batch_size, torch_device, optimizer, generator)
        val = run_epoch(decoder, val_x, val_y, config.batch_size, torch_device)
        row = epoch_summary(epoch, train, val, time.perf_counter() - started)
        history["epochs"].append(row)
        history["iterations"]["train"] += _iterations(epoch, train)
        history["iterations"]["val"] += _iterations(epoch, val)
        _save(out_dir / LAST_CHECKPOINT, decoder, {**meta, "epoch": epoch, "val_iou": row["val_iou"]})
        if row["val_iou"] > best_iou:
            best_iou = row["val_iou"]
            _save(out_dir / BEST_CHECKPOINT, decoder, {**meta, "epoch": epoch, "val_iou": best_iou})
            run.update(best_epoch=epoch, best_val_iou=best_iou)
        write_json(out_dir / HISTORY_FILE, history)
        write_json(out_dir / RUN_FILE, run)
        logger.info(f"{epoch:>5} {row['train_loss']:>10.4f} {row['train_iou']:>9.4f} {row['val_loss']:>9.4f} "
                    f"{row['val_iou']:>8.4f} {row['seconds']:>5.1f}s")
    return run


def _save(path: Path, decoder: nn.Module, meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        save_checkpoint(tmp, decoder, meta)
