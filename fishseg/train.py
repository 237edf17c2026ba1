"""Stage 2: train a decoder from the cache alone (no image decoding, no backbone).

A run directory holds ``run.json`` (config, cache fingerprint, backbone, best epoch),
``split.json`` (train/val image ids), ``history.json`` (per-iteration and per-epoch loss and IoU)
and the ``best``/``last`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fishseg import __version__, distributed
from fishseg.cache import FeatureCache
from fishseg.config import TrainConfig, to_json
from fishseg.data import (duplicates_across, grouped_folds, grouped_split, groups_from_names, random_folds,
                          random_split)
from fishseg.decoders import build_decoder, load_checkpoint, save_checkpoint, segment
from fishseg.distributed import Ranks
from fishseg.errors import FishsegError
from fishseg.metrics import binarize, iou_per_image
from fishseg.runtime import (atomic_path, autocast, available_memory, file_digest, read_json, resolve_device,
                             write_json)

logger = logging.getLogger(__name__)

RUN_FILE, SPLIT_FILE, HISTORY_FILE = "run.json", "split.json", "history.json"
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.safetensors", "last.safetensors"
TABLE_HEADER = f"{'epoch':>5} {'train loss':>10} {'train IoU':>9} {'val loss':>9} {'val IoU':>8} {'time':>6}"


@dataclasses.dataclass
class EpochResult:
    """Per-image and per-iteration values of one pass over a split."""

    image_losses: list[float]
    image_ious: list[float]
    iteration_losses: list[float]
    iteration_ious: list[float]

    @classmethod
    def from_ranks(cls, shares: list[tuple[list[list[float]], list[list[float]]]]) -> EpochResult:
        """Join every rank's per-batch (losses, IoUs): batch b's images are rank 0's share of b, then rank 1's…,
        the order of one process running the whole batch."""
        result = cls([], [], [], [])
        for batch in zip(*(zip(losses, ious) for losses, ious in shares)):
            losses = [value for rank_losses, _ in batch for value in rank_losses]
            ious = [value for _, rank_ious in batch for value in rank_ious]
            result.image_losses += losses
            result.image_ious += ious
            result.iteration_losses.append(float(np.mean(losses)))
            result.iteration_ious.append(float(np.mean(ious)))
        return result


class InMemorySplit:
    """A split's features (N×h×w×D float16) and masks (N×S×S uint8) held as two contiguous tensors."""

    def __init__(self, cache: FeatureCache, indices: np.ndarray) -> None:
        self.features = torch.from_numpy(cache.features(indices))
        self.masks = torch.from_numpy(cache.masks(indices))

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for positions in batches:
            yield self.features[positions], self.masks[positions]


class StreamedSplit:
    """A split read from the HDF5 file batch by batch, one batch ahead in a thread.

    Memory stays flat however large the cache; the read of the next batch overlaps the decoder
    step because torch releases the GIL while it computes.
    """

    def __init__(self, cache: FeatureCache, indices: np.ndarray) -> None:
        self.cache, self.indices = cache, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.indices[positions.numpy()]
        return torch.from_numpy(self.cache.features(indices)), torch.from_numpy(self.cache.masks(indices))

    def batches(self, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = None
            for positions in batches:
                upcoming = reader.submit(self._read, positions)
                if pending is not None:
                    yield pending.result()
                pending = upcoming
            if pending is not None:
                yield pending.result()


Split = InMemorySplit | StreamedSplit


def image_losses(logits: torch.Tensor, target: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """Per-image loss (B) of logits and 0/1 targets (B×S×S): BCE, soft Dice (1 − Dice of the
    probabilities, +1 smoothing) or their sum."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
    if loss == "bce":
        return bce
    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * target).sum((1, 2)) + 1) / (probs.sum((1, 2)) + target.sum((1, 2)) + 1)
    return dice if loss == "dice" else bce + dice


def dihedral(features: torch.Tensor, masks: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random flip/90° rotation, the same for the cached grids (B×h×w×D) and masks (B×S×S).

    An approximation: the features of a flipped photo are not exactly the flipped features."""
    turns, flip = torch.randint(0, 4, (2,), generator=generator).tolist()
    if flip % 2:
        features, masks = features.flip(2), masks.flip(2)
    return features.rot90(turns, dims=(1, 2)), masks.rot90(turns, dims=(1, 2))


def decoder_step(decoder: nn.Module, features: torch.Tensor, masks: torch.Tensor, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None, loss: str = "bce", *,
                 image_weight: float | None = None, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (and a training step when given an optimizer); returns per-image losses and IoUs (B).

    ``image_weight``: each image's weight in the loss, 1/B by default (the batch mean). Under torchrun a
    rank holds part of a global batch of G images and passes ``world/G``: DistributedDataParallel averages
    the ranks' gradients, which makes that the gradient of the global batch mean.
    """
    target = masks.to(device, non_blocking=True).float()
    with torch.set_grad_enabled(optimizer is not None), autocast(device):
        logits = segment(decoder, features.to(device, non_blocking=True), target.shape[-1])
    losses = image_losses(logits.float(), target, loss)
    if not ranks.all(torch.isfinite(losses).all()):
        raise FishsegError("loss is NaN or infinite; lower --lr (the last good checkpoint is kept)")
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        (losses.sum() * (1 / len(losses) if image_weight is None else image_weight)).backward()
        optimizer.step()
    return losses.detach(), iou_per_image(binarize(logits.detach()), target.bool())


def run_epoch(decoder: nn.Module, split: Split, batch_size: int, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None, *,
              loss: str = "bce", augment: str = "none",
              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, ranks: Ranks = Ranks()) -> EpochResult:
    """One pass over a split in random order with a training step per batch (given an optimizer), or in
    index order without.

    Under torchrun every rank draws the same order and augmentation, computes its contiguous share of each
    batch, and receives everyone's per-image values at the end: all ranks return the one-process result.
    """
    training = optimizer is not None
    decoder.train(training)
    order = torch.randperm(len(split), generator=generator) if training else torch.arange(len(split))
    batches = order.split(batch_size)
    losses_per_batch, ious_per_batch = [], []
    for batch, (features, masks) in zip(batches, split.batches(ranks.shard(batch) for batch in batches)):
        if training and augment == "flips":
            features, masks = dihedral(features, masks, generator)
        losses, ious = decoder_step(decoder, features, masks, device, optimizer, loss,
                                    image_weight=ranks.world / len(batch), ranks=ranks)
        if training and scheduler is not None:
            scheduler.step()
        # Python floats, not NumPy views of batch tensors: such small long-lived views pin heap pages
        # between the large per-batch buffers and made streamed training's RSS grow with the cache.
        losses_per_batch.append(losses.tolist())
        ious_per_batch.append(ious.tolist())
    return EpochResult.from_ranks(ranks.gather((losses_per_batch, ious_per_batch)))


def epoch_summary(epoch: int, train: EpochResult, val: EpochResult, seconds: float) -> dict[str, float]:
    """Means and standard deviations over images of one epoch, for history.json and the report."""
    row: dict[str, float] = {"epoch": epoch}
    for split, result in (("train", train), ("val", val)):
        losses, ious = np.array(result.image_losses), np.array(result.image_ious)
        row.update({f"{split}_loss": float(losses.mean()), f"{split}_loss_std": float(losses.std()),
                    f"{split}_iou": float(ious.mean()), f"{split}_iou_std": float(ious.std())})
    row["seconds"] = seconds
    return row


def _iterations(epoch: int, result: EpochResult) -> list[dict[str, float]]:
    return [{"epoch": epoch, "step": step, "loss": loss, "iou": iou}
            for step, (loss, iou) in enumerate(zip(result.iteration_losses, result.iteration_ious), start=1)]


def choose_split(cache: FeatureCache, indices: np.ndarray, stream: bool | None, processes: int = 1) -> Split:
    """In memory unless asked to stream, or (``stream=None``) unless it would take over half the free memory
    (each of the ``processes`` on this machine holding its own copy)."""
    if stream is None:
        needed = cache.bytes_per_image() * len(indices) * processes
        free = available_memory()
        stream = free is not None and needed > free // 2
    return StreamedSplit(cache, indices) if stream else InMemorySplit(cache, indices)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                           steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-iteration schedule: None (constant), or linear warm-up then cosine decay to 0."""
    if config.schedule == "constant":
        return None
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_indices(cache: FeatureCache, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train and val indices for ``config`` (split method, fold), and the groups they respect or leak."""
    groups = groups_from_names(cache.image_ids, config.group_pattern) if config.group_pattern else cache.groups
    if config.folds:
        folds = (grouped_folds(groups, cache.class_index, config.folds, config.seed) if config.split == "grouped"
                 else random_folds(len(cache), config.folds, config.seed))
        return (*folds[config.fold], groups)
    if config.split == "grouped":
        return (*grouped_split(groups, cache.class_index, config.val_fraction, config.seed), groups)
    return (*random_split(len(cache), config.val_fraction, config.seed), groups)


def _run_record(cache: FeatureCache, config: TrainConfig, train_idx: np.ndarray, val_idx: np.ndarray,
                groups: np.ndarray, streamed: bool, device: torch.device, ranks: Ranks) -> dict[str, Any]:
    return {
        "fishseg_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train_config": dataclasses.asdict(config),
        "cache": cache.summary(),
        "backbone": dataclasses.asdict(cache.backbone),
        "extract_config": json.loads(to_json(cache.config)),  # how to preprocess new images (predict)
        "split": {"method": config.split, "n_train": len(train_idx), "n_val": len(val_idx),
                  "groups": f"pattern {config.group_pattern}" if config.group_pattern else "near-duplicates",
                  "val_with_duplicate_in_train": duplicates_across(train_idx, val_idx, groups),
                  **({"fold": config.fold + 1, "folds": config.folds} if config.folds else {})},
        "features": "streamed from HDF5" if streamed else "in memory",
        "device": str(device),
        "processes": ranks.world,
    }


def run_training(cache_path: Path, out_dir: Path, config: TrainConfig, *, device: str = "auto",
                 stream: bool | None = None) -> dict[str, Any]:
    """Train ``config.decoder`` on the cache's train split; returns the contents of run.json.

    ``stream``: read batches from the HDF5 file (True), hold the split in memory (False), or
    decide from the free memory (None). Under torchrun each rank computes its share of every batch,
    and rank 0 writes the run folder.
    """
    with distributed.session(resolve_device(device)) as (ranks, torch_device), FeatureCache(cache_path) as cache:
        run = _train(cache, out_dir, config, ranks, torch_device, stream)
        ranks.barrier()  # the run folder is complete before any rank returns
    return run


def _train(cache: FeatureCache, out_dir: Path, config: TrainConfig, ranks: Ranks, device: torch.device,
           stream: bool | None) -> dict[str, Any]:
    train_idx, val_idx, groups = split_indices(cache, config)
    train, val = (choose_split(cache, indices, stream, ranks.local) for indices in (train_idx, val_idx))
    run = _run_record(cache, config, train_idx, val_idx, groups, isinstance(train, StreamedSplit), device, ranks)
    if ranks.main:
        write_json(out_dir / SPLIT_FILE, {"train": [cache.image_ids[i] for i in train_idx],
                                          "val": [cache.image_ids[i] for i in val_idx]})
    feature_dim = cache.backbone.feature_dim
    torch.manual_seed(config.seed)
    decoder = build_decoder(config.decoder, feature_dim).to(device)
    model = distributed.data_parallel(decoder, ranks, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    scheduler = learning_rate_schedule(optimizer, config, math.ceil(len(train) / config.batch_size))
    meta = {"decoder": config.decoder, "in_dim": feature_dim, "train_config": run["train_config"],
            "cache_fingerprint": cache.fingerprint}
    history: dict[str, Any] = {"iterations": {"train": [], "val": []}, "epochs": []}
    if ranks.main:
        logger.info("training %s on %d images, validating on %d (%s%s, features %s)", config.decoder, len(train),
                    len(val), device, f", {ranks.world} processes" if ranks.world > 1 else "", run["features"])
        logger.info(TABLE_HEADER)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_result = run_epoch(model, train, config.batch_size, device, optimizer, generator,
                                 loss=config.loss, augment=config.augment, scheduler=scheduler, ranks=ranks)
        val_result = run_epoch(model, val, config.batch_size, device, loss=config.loss, ranks=ranks)
        row = epoch_summary(epoch, train_result, val_result, time.perf_counter() - started)
        history["epochs"].append(row)
        history["iterations"]["train"] += _iterations(epoch, train_result)
        history["iterations"]["val"] += _iterations(epoch, val_result)
        improved = row["val_iou"] > run.get("best_val_iou", -1.0)
        if improved:
            run.update(best_epoch=epoch, best_val_iou=row["val_iou"])
        if ranks.main:
            _write_epoch(out_dir, decoder, meta, run, history, improved)
    return run


def _write_epoch(out_dir: Path, decoder: nn.Module, meta: dict[str, Any], run: dict[str, Any],
                 history: dict[str, Any], improved: bool) -> None:
    """The last (and, when ``improved``, the best) checkpoint, the history and run.json after an epoch."""
    row = history["epochs"][-1]
    checkpoint = {**meta, "epoch": row["epoch"], "val_iou": row["val_iou"]}
    _save(out_dir / LAST_CHECKPOINT, decoder, checkpoint, run)
    if improved:
        _save(out_dir / BEST_CHECKPOINT, decoder, checkpoint, run)
    write_json(out_dir / HISTORY_FILE, history)
    write_json(out_dir / RUN_FILE, run)
    logger.info(f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['train_iou']:>9.4f} {row['val_loss']:>9.4f} "
                f"{row['val_iou']:>8.4f} {row['seconds']:>5.1f}s")


def load_run(run_dir: Path) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """``run.json``, the best decoder and its checkpoint metadata; a modified checkpoint is refused."""
    if not (run_dir / RUN_FILE).is_file():
        raise FishsegError(f"{run_dir}: not a run folder (no {RUN_FILE}); pass the --out folder of `train`")
    run = read_json(run_dir / RUN_FILE)
    if file_digest(run_dir / BEST_CHECKPOINT) != run.get("checkpoints", {}).get(BEST_CHECKPOINT):
        raise FishsegError(f"{run_dir / BEST_CHECKPOINT}: does not match the SHA-256 recorded in {RUN_FILE} "
                           f"(modified or replaced); train again or restore the file")
    decoder, checkpoint = load_checkpoint(run_dir / BEST_CHECKPOINT)
    return run, decoder, checkpoint


def _save(path: Path, decoder: nn.Module, meta: dict[str, Any], run: dict[str, Any]) -> None:
    """Write a checkpoint atomically and record its SHA-256 in the run, so evaluate can spot tampering."""
    with atomic_path(path) as tmp:
        save_checkpoint(tmp, decoder, meta)
    run.setdefault("checkpoints", {})[path.name] = file_digest(path)
