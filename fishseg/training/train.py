"""Stage 2: train a decoder from the cache alone (no image decoding, no backbone).

The run folder it writes (record, split, history, checkpoints, resume state) is defined in
``fishseg.formats.runs``; this module only decides what goes into it and when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fishseg import distributed
from fishseg.classes import Classes
from fishseg.config import BINARY_LOSSES, IDENTITY, MULTICLASS_LOSSES, TrainConfig, shown, to_json
from fishseg.data.images import apply_view
from fishseg.data.splits import check_split, duplicates_across, split_indices
from fishseg.distributed import Ranks
from fishseg.errors import FishsegError, TrainingFailed
from fishseg.evaluation.metrics import (binarize, confusion_matrices, dataset_mean_iou, iou_per_image,
                                        mean_iou_per_image)
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import (FAILED, FINISHED, INTERRUPTED, RUN_FILE, RUN_KIND, RUNNING, SPLIT_FILE, RunFolder,
                                  RunRecord, check_resume_flags, differing_fields, history_entry)
from fishseg.models.decoders import CheckpointMeta, build_decoder, load_checkpoint, segment, uses_image
from fishseg.runtime import (active_precision, autocast, available_memory, backward_step, require_same_precision,
                             resolve_device)
from fishseg.training.losses import balanced_weights, class_losses, image_losses
from fishseg.training.resident import HeldSource, ResidentViews, fits_on_device, resident_bytes, upload

logger = logging.getLogger(__name__)

def _score_widths(score: str) -> tuple[int, int]:
    """The epoch table's train and val score columns: as wide as their headings, ``score`` IoU or mIoU."""
    return max(9, len(f"train {score}")), max(8, len(f"val {score}"))


def table_header(score: str) -> str:
    """The epoch table's header; ``score``: IoU (binary) or mIoU (several classes)."""
    train, val = _score_widths(score)
    return (f"{'epoch':>5} {'train loss':>10} {'train ' + score:>{train}} {'val loss':>9} {'val ' + score:>{val}} "
            f"{'time':>6}")


@dataclasses.dataclass
class EpochResult:
    """Per-image and per-iteration values of one pass over a split; with several classes, ``image_ious`` are
    per-image mIoU and ``confusion`` the split's confusion matrix (C×C, rows true), whose mIoU scores the pass."""

    image_losses: list[float]
    image_ious: list[float]
    iteration_losses: list[float]
    iteration_ious: list[float]
    confusion: np.ndarray | None = None

    @classmethod
    def from_ranks(cls, shares: list[tuple[list[list[float]], list[list[float]]]],
                   confusions: list[np.ndarray | None] | None = None) -> EpochResult:
        """Join every rank's per-batch (losses, IoUs): batch b's images are rank 0's share of b, then rank 1's…,
        the order of one process running the whole batch. ``confusions``: each rank's confusion matrix (several
        classes), summed."""
        result = cls([], [], [], [], None if not confusions or confusions[0] is None else sum(confusions))
        for batch in zip(*(zip(losses, ious) for losses, ious in shares)):
            losses = [value for rank_losses, _ in batch for value in rank_losses]
            ious = [value for _, rank_ious in batch for value in rank_ious]
            result.image_losses += losses
            result.image_ious += ious
            result.iteration_losses.append(float(np.mean(losses)))
            result.iteration_ious.append(float(np.mean(ious)))
        return result

    @property
    def score(self) -> float:
        """The pass's validation score: mean per-image IoU (binary), dataset mIoU (several classes)."""
        if self.confusion is None:
            return float(np.mean(self.image_ious))
        return dataset_mean_iou(torch.from_numpy(self.confusion))


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training step minimises and how a pass is scored: binary (``image_losses``, IoU at probability 0.5)
    or several classes (``class_losses``, optionally class-weighted; per-image mIoU and the pooled confusion)."""

    classes: Classes = Classes()
    loss: str = "bce"
    weights: torch.Tensor | None = None  # C per-class loss weights (several classes); None: all 1

    def __post_init__(self) -> None:
        allowed = BINARY_LOSSES if self.classes.binary else MULTICLASS_LOSSES
        if self.loss not in allowed:
            raise ValueError(f"loss {self.loss!r} is not one of {allowed} for {self.classes.describe()}")
        if self.weights is not None and (self.classes.binary or len(self.weights) != len(self.classes)):
            raise ValueError(f"{len(self.weights)} class weights for {self.classes.describe()}")

    @classmethod
    def of(cls, cache: FeatureCache, config: TrainConfig, device: torch.device = torch.device("cpu")) -> Objective:
        """The run's objective on ``cache`` (checked by ``check_cache``), its weights on ``device``."""
        weights = (torch.from_numpy(balanced_weights(cache.class_pixels)).to(device)
                   if config.class_weights == "balanced" else None)
        return cls(cache.classes, config.loss, weights)

    def losses(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Per-image losses (B) of ``segment``'s logits and the uint8 masks B×S×S."""
        if self.classes.binary:
            return image_losses(logits, masks.float(), self.loss)
        return class_losses(logits, masks, self.loss, self.weights)

    def scores(self, logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image IoU (binary) or mIoU (B), and with several classes the batch's confusion matrix C×C."""
        if self.classes.binary:
            return iou_per_image(binarize(logits), masks.bool()), None
        confusion = confusion_matrices(self.classes.labels(logits), masks, len(self.classes))
        return mean_iou_per_image(confusion), confusion.sum(0)


def check_objective(cache: FeatureCache, config: TrainConfig) -> None:
    """Refuse a loss or class weights that do not fit the cache's classes, in one line naming it."""
    classes = cache.classes
    if classes.binary and config.loss not in BINARY_LOSSES:
        raise FishsegError(f"{cache.path}: holds binary masks; `loss={shown(config.loss)}` needs a cache extracted "
                           f"with pixel classes; use one of {', '.join(BINARY_LOSSES)}")
    if not classes.binary and config.loss not in MULTICLASS_LOSSES:
        raise FishsegError(f"{cache.path}: holds {classes.describe()}; `loss={shown(config.loss)}` is for binary "
                           f"masks; use one of {', '.join(MULTICLASS_LOSSES)}")
    if config.class_weights == "none":
        return
    if classes.binary:
        raise FishsegError(f"{cache.path}: holds binary masks; `class_weights={shown(config.class_weights)}` weighs "
                           f"several classes; leave it at 'none'")
    if cache.class_pixels is None:
        raise FishsegError(f"{cache.path}: an older cache that did not count pixels per class, which "
                           f"`class_weights={shown(config.class_weights)}` needs; extract it again")


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # features, masks, guide previews (or None)
ViewIds = torch.Tensor | None  # per image of a split, the position of the view it is seen in; None: the photo as is


def _read_views(rows: Any, view_ids: ViewIds, views: tuple[str, ...], read: Callable[[str, Any], Batch]) -> Batch:
    """A batch whose images are seen in different views: ``read(view, rows)`` once per view present, each part
    (features, masks, guides or None) joined back in batch order."""
    if view_ids is None or not len(rows):
        return read(IDENTITY, rows)
    parts = [(where, read(views[k], rows[where.numpy()])) for k in view_ids.unique().tolist()
             for where in [view_ids == k]]
    joined = []
    for position, first in enumerate(parts[0][1]):
        if first is None:  # no guides
            joined.append(None)
            continue
        whole = first.new_empty((len(rows), *first.shape[1:]))
        for where, tensors in parts:
            whole[where] = tensors[position]
        joined.append(whole)
    return joined[0], joined[1], joined[2]


class InMemorySplit:
    """A split of features (h×w×C per view), masks (uint8 S×S) and, for a decoder that uses the image, guide
    previews (uint8 P×P×3) held whole in memory or on the GPU, gathered per batch on the device that holds
    them from tensors that may hold the whole cache (a sweep loads it once for all its runs). ``channels``
    selects the run's layers (None: all)."""

    def __init__(self, features: Mapping[str, torch.Tensor], masks: torch.Tensor, indices: np.ndarray,
                 channels: np.ndarray | None = None, views: tuple[str, ...] = (IDENTITY,),
                 previews: torch.Tensor | None = None) -> None:
        self.features, self.masks, self.views, self.previews = features, masks, views, previews
        self.indices = torch.from_numpy(np.asarray(indices)).to(masks.device)
        self.channels = None if channels is None else torch.from_numpy(channels).to(masks.device)

    @classmethod
    def from_cache(cls, cache: FeatureCache, indices: np.ndarray) -> InMemorySplit:
        """Only ``indices`` read into memory (features and masks, no previews)."""
        return cls({IDENTITY: torch.from_numpy(cache.features(indices))}, torch.from_numpy(cache.masks(indices)),
                   np.arange(len(indices)))

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, view: str, rows: torch.Tensor) -> Batch:
        features = self.features[view][rows]
        guides = None if self.previews is None else apply_view(self.previews[rows], view, (1, 2))
        return (features if self.channels is None else features[..., self.channels],
                apply_view(self.masks[rows], view, (1, 2)), guides)

    def batches(self, batches: Iterable[torch.Tensor], view_ids: ViewIds = None) -> Iterator[Batch]:
        """The batches of positions, their rows gathered where the tensors are: the positions go there in one
        copy, not one a batch."""
        batches = list(batches)
        if not batches:
            return
        there = torch.cat(batches).to(self.masks.device, non_blocking=True).split([len(b) for b in batches])
        for positions, rows in zip(batches, there):
            yield _read_views(self.indices[rows], None if view_ids is None else view_ids[positions], self.views,
                              self._read)


class StreamedSplit:
    """A split read from the HDF5 file batch by batch, one batch ahead in a thread.

    Memory stays flat however large the cache; the read of the next batch overlaps the decoder
    step because torch releases the GIL while it computes.
    """

    def __init__(self, cache: FeatureCache, indices: np.ndarray, layers: tuple[int, ...] | None = None,
                 guides: bool = False) -> None:
        self.cache, self.indices, self.layers, self.views, self.guides = cache, indices, layers, cache.views, guides

    def __len__(self) -> int:
        return len(self.indices)

    def _read_view(self, view: str, rows: np.ndarray) -> Batch:
        guides = apply_view(torch.from_numpy(self.cache.previews(rows)), view, (1, 2)) if self.guides else None
        return (torch.from_numpy(self.cache.features(rows, view, self.layers)),
                torch.from_numpy(self.cache.masks(rows, view)), guides)

    def _read(self, positions: torch.Tensor, view_ids: ViewIds) -> Batch:
        return _read_views(self.indices[positions.numpy()], None if view_ids is None else view_ids[positions],
                           self.views, self._read_view)

    def batches(self, batches: Iterable[torch.Tensor], view_ids: ViewIds = None) -> Iterator[Batch]:
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = None
            for positions in batches:
                upcoming = reader.submit(self._read, positions, view_ids)
                if pending is not None:
                    yield pending.result()
                pending = upcoming
            if pending is not None:
                yield pending.result()


Split = InMemorySplit | StreamedSplit


def dihedral(generator: torch.Generator, *grids: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """One random flip/90° rotation, the same for every grid given (B×H×W…: the cached features B×h×w×D,
    masks B×S×S, guide previews B×P×P×3); ``None`` passes through.

    An approximation for the features: those of a flipped photo are not exactly the flipped features."""
    turns, flip = torch.randint(0, 4, (2,), generator=generator).tolist()

    def transform(grid: torch.Tensor) -> torch.Tensor:
        return (grid.flip(2) if flip % 2 else grid).rot90(turns, dims=(1, 2))

    return tuple(None if grid is None else transform(grid) for grid in grids)


def decoder_step(decoder: nn.Module, features: torch.Tensor, masks: torch.Tensor, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None, objective: Objective = Objective(), *,
                 guides: torch.Tensor | None = None,
                 image_weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward (and a training step when given an optimizer); returns per-image losses and IoUs (B; with several
    classes mIoUs) and, with several classes, the batch's confusion matrix (C×C), on the device and without
    waiting for it: a non-finite loss is the caller's to check (``run_epoch``, once an epoch). ``masks``: uint8
    class indices B×S×S; ``guides``: the previews B×P×P×3, for a decoder that uses the image.

    ``image_weight``: each image's weight in the loss, 1/B by default (the batch mean). Under torchrun a
    rank holds part of a global batch of G images and passes ``world/G``: DistributedDataParallel averages
    the ranks' gradients, which makes that the gradient of the global batch mean.
    """
    masks = masks.to(device, non_blocking=True)
    with torch.set_grad_enabled(optimizer is not None), autocast(device, "decoder"):
        logits = segment(decoder, features.to(device, non_blocking=True), masks.shape[-1],
                         None if guides is None else guides.to(device, non_blocking=True))
    losses = objective.losses(logits.float(), masks)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        backward_step(optimizer, losses.sum() * (1 / len(losses) if image_weight is None else image_weight), device)
    return (losses.detach(), *objective.scores(logits.detach(), masks))


def run_epoch(decoder: nn.Module, split: Split, batch_size: int, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None, *,
              objective: Objective = Objective(), augment: str = "none",
              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, ranks: Ranks = Ranks()) -> EpochResult:
    """One pass over a split in random order with a training step per batch (given an optimizer), or in
    index order without.

    The per-image values stay on the device until the epoch ends (one copy to the host, no wait per step);
    a non-finite loss then stops the run, the epoch unrecorded. Under torchrun every rank draws the same
    order and augmentation, computes its contiguous share of each batch, and receives everyone's per-image
    values (and confusion matrices) at the end: all ranks return the one-process result.
    """
    training = optimizer is not None
    decoder.train(training)
    order = torch.randperm(len(split), generator=generator) if training else torch.arange(len(split))
    views = (torch.randint(0, len(split.views), (len(split),), generator=generator)
             if training and augment == "views" else None)  # one stored view per image, identity included
    batches = order.split(batch_size)
    shards = [ranks.shard(batch) for batch in batches]
    losses, ious = [], []
    confusion = None if objective.classes.binary else torch.zeros(len(objective.classes), len(objective.classes),
                                                                  dtype=torch.int64, device=device)
    for batch, (features, masks, guides) in zip(batches, split.batches(shards, views)):
        if training and augment == "flips":
            features, masks, guides = dihedral(generator, features, masks, guides)
        batch_losses, batch_ious, batch_confusion = decoder_step(
            decoder, features, masks, device, optimizer, objective, guides=guides,
            image_weight=ranks.world / len(batch))
        if training and scheduler is not None:
            scheduler.step()
        losses.append(batch_losses)
        ious.append(batch_ious)
        if confusion is not None:
            confusion += batch_confusion
    sizes = [len(shard) for shard in shards]
    shares = ranks.gather((_per_batch(losses, sizes), _per_batch(ious, sizes),
                           None if confusion is None else confusion.cpu().numpy()))
    result = EpochResult.from_ranks([share[:2] for share in shares], [share[2] for share in shares])
    if not all(map(math.isfinite, result.image_losses)):
        raise TrainingFailed(f"loss is NaN or infinite: {_non_finite_cause(split, shards, views, result, ranks)} "
                             f"(the last good checkpoint is kept)")
    return result


def _per_batch(values: list[torch.Tensor], sizes: list[int]) -> list[list[float]]:
    """Per-batch device tensors as per-batch lists of Python floats, in one copy to the host (Python floats,
    not NumPy views: small long-lived views pin heap pages between large buffers and made streamed
    training's RSS grow with the cache)."""
    flat = torch.cat(values).cpu().tolist() if values else []
    ends = np.cumsum(sizes).tolist()
    return [flat[end - size:end] for size, end in zip(sizes, ends)]


def _non_finite_cause(split: Split, shards: list[torch.Tensor], views: ViewIds, result: EpochResult,
                      ranks: Ranks) -> str:
    """Why the epoch's loss went non-finite, from the features of the first batch where it did."""
    first = next(k for k, value in enumerate(result.iteration_losses) if not math.isfinite(value))
    features = next(iter(split.batches([shards[first]], views)))[0]
    return ("the decoder diverged on finite features; lower `lr`" if ranks.all(torch.isfinite(features).all())
            else "the batch's features hold NaN or inf; extract the cache again")


def epoch_summary(epoch: int, train: EpochResult, val: EpochResult, seconds: float) -> dict[str, float]:
    """Means and standard deviations over images of one epoch, for history.json and the report; with several
    classes ``*_iou`` is the split's dataset mIoU (``*_iou_std`` that of the per-image mIoU)."""
    row: dict[str, float] = {"epoch": epoch}
    for split, result in (("train", train), ("val", val)):
        losses, ious = np.array(result.image_losses), np.array(result.image_ious)
        row.update({f"{split}_loss": float(losses.mean()), f"{split}_loss_std": float(losses.std()),
                    f"{split}_iou": result.score, f"{split}_iou_std": float(ious.std())})
    row["seconds"] = seconds
    return row


def _iterations(epoch: int, result: EpochResult) -> list[dict[str, float]]:
    return [{"epoch": epoch, "step": step, "loss": loss, "iou": iou}
            for step, (loss, iou) in enumerate(zip(result.iteration_losses, result.iteration_ious), start=1)]


@dataclasses.dataclass
class TrainingData:
    """A cache opened for training: every image's features and masks (and, with ``guides``, previews) held
    once, on the training device when they fit there (a sweep's runs share them), or ``None`` for all when
    batches are streamed from the file."""

    cache: FeatureCache
    features: Mapping[str, torch.Tensor] | None  # per view, read on first use
    masks: torch.Tensor | None
    previews: torch.Tensor | None = None
    guides: bool = False  # whether splits can yield the previews, for decoders that use the image

    @classmethod
    def open(cls, cache: FeatureCache, stream: bool | None, processes: int = 1, *, guides: bool = False,
             device: torch.device = torch.device("cpu"), dtype: torch.dtype | None = None) -> TrainingData:
        """On a GPU ``device`` where the cache fits in its free memory (features as ``dtype``, None: as
        stored), unless asked to stream; else in memory unless asked to stream, or (``stream=None``) unless the
        cache would take over half the free memory (each of the ``processes`` on this machine holding its own
        copy). ``guides``: some decoder to train uses the image, so the previews are held (or streamed) too."""
        on_device = stream is not True and fits_on_device(cache, device, dtype, guides)
        if stream is None and not on_device:
            free = available_memory()
            needed = resident_bytes(cache, None, guides) * processes
            stream = free is not None and needed > free // 2
        if stream and not on_device:
            return cls(cache, None, None, guides=guides)
        target = device if on_device else torch.device("cpu")
        features = ResidentViews(cache, target, dtype)
        features[IDENTITY]  # read now: a run that does not need the other views never reads them
        masks = upload(cache.masks, cache.file["masks"], target)
        previews = upload(cache.previews, cache.file["previews"], target) if guides else None
        return cls(cache, features, masks, previews, guides)

    @property
    def streamed(self) -> bool:
        return self.features is None

    def describe(self) -> str:
        """Where the features are read from, for the run record."""
        if self.masks is None:
            return "streamed from HDF5"
        return "in memory" if self.masks.device.type == "cpu" else f"resident on {self.masks.device}"

    def scoring_source(self) -> FeatureCache | HeldSource:
        """Where scoring after training reads: the held tensors, or the cache when streamed."""
        if self.features is None or self.masks is None:
            return self.cache
        return HeldSource(self.cache, self.features, self.masks, self.previews)

    def split(self, indices: np.ndarray, layers: tuple[int, ...] | None = None, *, guides: bool = False) -> Split:
        """Images ``indices`` with the cached blocks ``layers`` (None: all); ``guides``: batches carry their
        previews (the data was opened with guides)."""
        assert self.guides or not guides, "TrainingData.open(..., guides=True) is needed to train on the image"
        if self.features is None or self.masks is None:
            return StreamedSplit(self.cache, indices, layers, guides)
        return InMemorySplit(self.features, self.masks, indices, self.cache.channels(layers), self.cache.views,
                             self.previews if guides else None)


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


def _new_record(cache: FeatureCache, config: TrainConfig, train_idx: np.ndarray, val_idx: np.ndarray,
                groups: np.ndarray) -> RunRecord:
    split = {"method": config.split, "n_train": len(train_idx), "n_val": len(val_idx),
             "groups": f"pattern {config.group_pattern}" if config.group_pattern else "near-duplicates",
             "val_with_duplicate_in_train": duplicates_across(train_idx, val_idx, groups),
             **({"fold": config.fold + 1, "folds": config.folds} if config.folds else {})}
    where = {"path": str(cache.path.resolve())}  # so that `compare` finds it from any folder
    return RunRecord(train_config=config, cache={**cache.summary(), **where},
                     backbone=dataclasses.asdict(cache.backbone), extract_config=json.loads(to_json(cache.config)),
                     split=split, features="", device="", processes=1)  # the last three: set by each session


def check_cache(cache: FeatureCache, config: TrainConfig) -> tuple[int, ...]:
    """The cached blocks the run reads; a block or the views it needs and the cache lacks are refused, and a loss
    or class weights that do not fit its classes."""
    check_objective(cache, config)
    if config.augment == "views" and len(cache.views) == 1:
        raise FishsegError(f"`augment='views'`: {cache.path} holds no views but the photo as it is; extract it "
                           f"again with views, e.g. `views=('hflip', 'vflip', 'rot90')`")
    return cache.select_layers(config.layers)


def plan_run(out_dir: Path, config: TrainConfig, cache: FeatureCache, *, resume: bool,
             overwrite: bool) -> RunRecord | None:
    """The record to continue (``resume``), or None to start afresh. Refuses, changing nothing, whatever
    would lose or corrupt a run: an existing run without --resume or --overwrite, a resume with other
    settings or another cache, a folder another process is training into; and whatever training would refuse
    once the folder is written (blocks or views the cache lacks, a split its images cannot give)."""
    check_resume_flags(resume, overwrite)
    folder = RunFolder(out_dir)
    folder.require_kind(RUN_KIND)
    check_cache(cache, config)
    check_split(cache, config)
    if not folder.holds_run:
        if resume:
            raise FishsegError(f"{out_dir}: holds no run to resume; leave `resume=True` out to start one")
        return None
    if folder.locked:
        raise FishsegError(f"{out_dir}: another process is training into this folder; wait for it or stop it")
    if overwrite:
        return None
    record = folder.read_record()
    record.refuse_if_failed(out_dir)
    if not resume:
        raise FishsegError(f"{out_dir}: already holds a run ({record.describe()}); pass `resume=True` to continue "
                           f"it or `overwrite=True` to replace it")
    differing = differing_fields(record.train_config, config)
    if differing:
        raise FishsegError(f"{out_dir}: the run was trained with other settings ({'; '.join(differing)}); "
                           f"resume with its settings, or train into another `out`")
    cache.require(record.cache, out_dir / RUN_FILE, folder.split_digests())
    return record


def run_training(cache_path: Path, out_dir: Path, config: TrainConfig, *, device: str = "auto",
                 stream: bool | None = None, resume: bool = False, overwrite: bool = False,
                 compiled: bool = False) -> RunRecord:
    """Train ``config.decoder`` on the cache's train split into ``out_dir``; returns the run's record.

    ``stream``: read batches from the HDF5 file (True), hold the cache in memory (False), or decide from
    the free memory (None). ``resume`` continues an unfinished run from its last finished epoch;
    ``overwrite`` replaces an existing run; ``compiled`` runs the decoder through ``torch.compile``. Under
    torchrun each rank computes its share of every batch, and rank 0 writes the run folder.
    """
    with distributed.session(resolve_device(device)) as (ranks, torch_device), FeatureCache(cache_path) as cache:
        plan_run(out_dir, config, cache, resume=resume, overwrite=overwrite)  # refuse before loading anything
        data = TrainingData.open(cache, stream, ranks.local, guides=uses_image(config.decoder), device=torch_device)
        record = train_run(data, out_dir, config, ranks=ranks, device=torch_device, resume=resume,
                           overwrite=overwrite, compiled=compiled)
        ranks.barrier()  # the run folder is complete before any rank returns
    return record


def fused_option(device: torch.device) -> dict[str, bool]:
    """AdamW's fused kernel (one launch for every parameter) on CUDA; the CPU keeps the default, whose
    numbers the CPU tests and resumes were written with."""
    return {"fused": True} if device.type == "cuda" else {}


EpochCallback = Callable[[RunRecord, dict[str, float]], None]


def train_run(data: TrainingData, out_dir: Path, config: TrainConfig, *, ranks: Ranks = Ranks(),
              device: torch.device = torch.device("cpu"), resume: bool = False, overwrite: bool = False,
              on_epoch: EpochCallback | None = None, compiled: bool = False) -> RunRecord:
    """Train into ``out_dir`` from already opened data (``run_training`` opens it; a sweep shares it).

    ``on_epoch`` sees the record and the epoch's summary row after each epoch (default: a log line).
    A finished run asked to resume is returned as it is.
    """
    previous = plan_run(out_dir, config, data.cache, resume=resume, overwrite=overwrite)
    ranks.barrier()  # every rank has read the folder before rank 0 writes into it
    folder = RunFolder(out_dir)
    if previous is not None and previous.status == FINISHED:
        folder.verify_files(previous)  # "finished" is said of files that are still the run's
        logger.info("%s: finished already (%s); nothing to resume", out_dir, previous.describe())
        return previous
    if previous is not None and previous.epochs_done == 0:
        previous = None  # stopped before its first epoch: nothing to continue, start again in place
    created = not out_dir.exists()
    with folder.lock() if ranks.main else contextlib.nullcontext():
        if ranks.main and overwrite:
            if folder.holds_run:
                logger.info("%s: replacing the run there (`overwrite=True`)", out_dir)
            folder.clear()
        elif ranks.main:
            folder.clear_report()  # a resumed run trains on: its report would describe the run as it was
        try:
            return _train(data, folder, config, ranks, device, previous, on_epoch or _log_epoch, compiled)
        except (KeyboardInterrupt, FishsegError) as stop:
            if ranks.main:
                _after_stop(folder, created, stop)
            raise


def _after_stop(folder: RunFolder, created: bool, stop: BaseException) -> None:
    """Record a stopped run: failed, with why, when its training failed (a resume would repeat that); else
    interrupted (resumable: Ctrl-C, SIGTERM, a refusal before training went on). A run stopped before finishing
    an epoch leaves nothing behind: there is nothing to resume, and the same command starts again."""
    record = folder.read_record() if folder.holds_run else None  # the committed state, not this process's
    if record is not None and record.epochs_done:
        failed = isinstance(stop, TrainingFailed)
        folder.write_record(dataclasses.replace(record, status=FAILED if failed else INTERRUPTED,
                                                failure=str(stop) if failed else ""))
        return
    folder.clear()
    if created:
        shutil.rmtree(folder.path, ignore_errors=True)


@dataclasses.dataclass
class _Session:
    """The decoder, its optimizer and the random state of one training session (fresh or resumed)."""

    decoder: nn.Module
    model: nn.Module  # the decoder, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator


_GLOBAL_RNG = threading.Lock()


def _start_session(config: TrainConfig, meta: CheckpointMeta, steps_per_epoch: int, ranks: Ranks,
                   device: torch.device, folder: RunFolder, previous: RunRecord | None, compiled: bool) -> _Session:
    with _GLOBAL_RNG:  # a sweep's concurrent jobs each get the initial weights of their seed
        torch.manual_seed(config.seed)
        decoder = build_decoder(config.decoder, meta.in_dim, meta.pixel_classes.channels)
    if previous is not None:
        decoder.load_state_dict(load_checkpoint(folder.verified(previous.checkpoints["last"]))[0].state_dict())
    decoder.to(device)
    model = distributed.data_parallel(decoder, ranks, device)
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  **fused_option(device))
    scheduler = learning_rate_schedule(optimizer, config, steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    if previous is not None:
        folder.read_resume_state(previous, optimizer, scheduler, generator)
    return _Session(decoder, model, optimizer, scheduler, generator)


def _train(data: TrainingData, folder: RunFolder, config: TrainConfig, ranks: Ranks, device: torch.device,
           previous: RunRecord | None, on_epoch: EpochCallback, compiled: bool) -> RunRecord:
    cache = data.cache
    train_idx, val_idx, groups = split_indices(cache, config)
    layers = check_cache(cache, config)
    guides = uses_image(config.decoder)
    train, val = data.split(train_idx, layers, guides=guides), data.split(val_idx, layers, guides=guides)
    meta = checkpoint_meta(cache, config, layers)
    objective = Objective.of(cache, config, device)
    session = _start_session(config, meta, math.ceil(len(train) / config.batch_size), ranks,
                             device, folder, previous, compiled)
    split = {"train": [cache.image_ids[i] for i in train_idx], "val": [cache.image_ids[i] for i in val_idx]}
    if previous is not None and folder.read_split(previous) != split:
        raise FishsegError(f"{folder.path / SPLIT_FILE}: differs from the split its settings give on {cache.path}; "
                           f"the run cannot be resumed (train it again with `overwrite=True`)")
    record = previous or _new_record(cache, config, train_idx, val_idx, groups)
    record = dataclasses.replace(record, status=RUNNING, features=data.describe(), device=str(device),
                                 processes=ranks.world, compiled=compiled,
                                 precision=active_precision(device).decoder_name,
                                 deterministic=torch.are_deterministic_algorithms_enabled())
    require_same_precision((previous or record).precision, record.precision, folder.path / RUN_FILE,
                           "resume with its `precision`, or train into another `out`")
    if ranks.main:
        if previous is None:
            record = dataclasses.replace(record, split_sha256=folder.write_split(split["train"], split["val"],
                                                                               cache.digests))
        else:
            folder.cut_history(record)
        folder.write_record(record)
        logger.info("%s %s on %d images, validating on %d (%s%s, features %s)",
                    "resuming" if previous else "training", config.decoder, len(train), len(val), device,
                    f", {ranks.world} processes" if ranks.world > 1 else "", record.features)
        if on_epoch is _log_epoch:
            logger.info(table_header(record.score_name))
    for epoch in range(record.epochs_done + 1, config.epochs + 1):
        started = time.perf_counter()
        train_result = run_epoch(session.model, train, config.batch_size, device, session.optimizer,
                                 session.generator, objective=objective, augment=config.augment,
                                 scheduler=session.scheduler, ranks=ranks)
        val_result = run_epoch(session.model, val, config.batch_size, device, objective=objective, ranks=ranks)
        row = epoch_summary(epoch, train_result, val_result, time.perf_counter() - started)
        entry = history_entry(row, {"train": _iterations(epoch, train_result), "val": _iterations(epoch, val_result)})
        improved = row["val_iou"] > record.best_val_iou
        record = dataclasses.replace(
            record, epochs_done=epoch, status=FINISHED if epoch == config.epochs else RUNNING,
            train_seconds=record.train_seconds + row["seconds"],
            **({"best_epoch": epoch, "best_val_iou": row["val_iou"]} if improved else {}))
        if ranks.main:
            record = _commit(folder, record, entry, session, dataclasses.replace(meta, val_iou=row["val_iou"]),
                             improved)
            on_epoch(record, row)
    return record


def checkpoint_meta(cache: FeatureCache, config: TrainConfig, layers: tuple[int, ...]) -> CheckpointMeta:
    """What the run's checkpoints carry (before their epoch's score): the decoder, the features it reads, its
    recipe and cache, and with several classes their names and colours."""
    classes = cache.classes
    several = {} if classes.binary else {"classes": classes.names, "colours": classes.colours}
    return CheckpointMeta(config.decoder, len(layers) * cache.backbone.feature_dim, layers, dataclasses.asdict(config),
                          cache.fingerprint, **several)


def _commit(folder: RunFolder, record: RunRecord, entry: dict[str, Any], session: _Session, meta: CheckpointMeta,
            improved: bool) -> RunRecord:
    """Write the epoch's checkpoint (and, unless the run is finished, its resume state), then commit the
    record that names them; returns that record."""
    epoch = record.epochs_done
    last = folder.write_checkpoint(epoch, session.decoder, meta)
    checkpoints = {"best": last if improved else record.checkpoints["best"], "last": last}
    if record.status != FINISHED:
        checkpoints["resume"] = folder.write_resume_state(epoch, session.optimizer, session.scheduler,
                                                          session.generator)
    record = dataclasses.replace(record, checkpoints=checkpoints)
    folder.commit_epoch(record, entry)
    return record


def _log_epoch(record: RunRecord, row: dict[str, float]) -> None:
    train, val = _score_widths(record.score_name)
    logger.info(f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['train_iou']:>{train}.4f} {row['val_loss']:>9.4f} "
                f"{row['val_iou']:>{val}.4f} {row['seconds']:>5.1f}s")
