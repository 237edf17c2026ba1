"""Stage 1: run the frozen backbone once over a dataset and write the HDF5 cache.

Extraction is resumable: finished batches are kept in ``<cache>.parts/`` (see ``fishseg.formats.cache``),
so a run stopped at any moment and started again with the same command continues where it
stopped, and the finished cache equals that of an uninterrupted run. A finished cache is never
rewritten without ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fishseg import distributed
from fishseg.version import __version__
from fishseg.config import (DEFAULT_COMPRESSION, IDENTITY, ExtractConfig, check_compression, check_patch_multiple,
                            resolve_layers)
from fishseg.data.images import ExtractionDataset, Sample, apply_view, discover_samples
from fishseg.data.labels import check_classes_present, check_layout_classes, mask_reader
from fishseg.data.splits import near_duplicate_groups, thumbnails
from fishseg.distributed import Ranks
from fishseg.errors import FishsegError
from fishseg.formats.cache import (CacheWriter, FeatureCache, PartStore, discard_parts, disk_errors, feature_name,
                                   is_cache, non_finite_images, parts_dir, setting_changes)
from fishseg.models.backbone import Backbone, backbone_reference, load_backbone
from fishseg.runtime import (active_precision, default_batch_size, default_num_workers, make_output_dir, plural,
                             resolve_device)

logger = logging.getLogger(__name__)


def check_existing(out: Path, config: ExtractConfig, samples: list[Sample]) -> None:
    """Accept a finished cache made with ``config`` from exactly these files; otherwise say why not. Settings
    the cache's backbone cannot take are refused first, so that overwriting is advised only where it helps."""
    with FeatureCache(out) as cache:
        if config.backbone == cache.config.backbone:
            check_settings(config, cache.backbone.patch_size, cache.num_blocks)
        if cache.config != config:
            changed = setting_changes(dataclasses.asdict(cache.config), dataclasses.asdict(config))
            raise FishsegError(f"{out}: extracted with other settings ({'; '.join(changed)}); "
                               f"pass `overwrite=True` to replace it")
        changes = cache.staleness(samples)
    if any(changes.values()):
        raise FishsegError(f"{out}: stale: {changes['added']} added, {changes['removed']} removed, "
                           f"{changes['modified']} modified images under the data root; pass "
                           f"`overwrite=True` to extract again")


def check_settings(config: ExtractConfig, patch_size: int, num_blocks: int) -> None:
    """Refuse, before any work, an image size the backbone's patches do not tile and blocks it lacks
    (``num_blocks`` 0: unknown, as a format 2 cache did not record it)."""
    check_patch_multiple(config.image_size, patch_size)
    if num_blocks:
        resolve_layers(config.layers, num_blocks)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """One computed batch on its way to the part store. On CUDA its host tensors are still being copied from
    the device until ``ready`` completes (None on the CPU: already there)."""

    start: int
    stop: int
    features: dict[str, torch.Tensor]  # by part-store name, B×h×w×L·D float16
    non_finite: torch.Tensor  # B bool: some view's features hold NaN or inf
    masks: torch.Tensor
    previews: torch.Tensor
    errors: tuple[str, ...]  # per image, empty when it was read
    ready: torch.cuda.Event | None


@torch.inference_mode()
def _compute(backbone: Backbone, config: ExtractConfig, start: int, stop: int, images: torch.Tensor,
             masks: torch.Tensor, previews: torch.Tensor, errors: list[str]) -> _Batch:
    """Run every view of one batch, uploaded once (each view made on the device), and queue the results'
    copy to the host without waiting for it."""
    images = images.to(backbone.device, non_blocking=True)
    grids = [backbone(apply_view(images, view, (2, 3)), config.layers) for view in (IDENTITY, *config.views)]
    non_finite = torch.stack([non_finite_images(grid) for grid in grids]).any(0)
    host = [tensor.to("cpu", non_blocking=True) for tensor in (*grids, non_finite)]  # pinned on CUDA
    ready = None
    if backbone.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    names = [feature_name(view) for view in (IDENTITY, *config.views)]
    return _Batch(start, stop, dict(zip(names, host[:-1])), host[-1], masks, previews, tuple(errors), ready)


THREADED_WRITES = frozenset({"cuda"})  # device types whose batches are written on a thread (see _PartWriter)


class _PartWriter:
    """Writes computed batches to the part store on a thread of its own, fed through a bounded queue, so that
    the backbone computes batch k+1 while batch k is checked, thumbnailed and written. Only where the backbone
    runs on a GPU (``threaded``): on the CPU every core already computes, and the thread only competes with the
    backbone's own threads (measured: 5% fewer images a second), so batches are written in turn there.

    The first error (an unreadable image or non-finite features without ``skip_bad``, a full disk) stops the
    writing and is raised in the main thread by the next ``put`` or on leaving the block; batches queued
    before the main thread stops (Ctrl-C included) are written first, each atomically, as the serial loop
    would have written them, and none after a failed one.
    """

    def __init__(self, store: PartStore, samples: list[Sample], skip_bad: bool, progress: tqdm, threaded: bool,
                 depth: int = 2) -> None:
        self.store, self.samples, self.skip_bad, self.progress = store, samples, skip_bad, progress
        self.threaded = threaded
        self.queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fishseg-part-writer", daemon=True)

    def __enter__(self) -> _PartWriter:
        if self.threaded:
            self.thread.start()
        return self

    def put(self, batch: _Batch) -> None:
        self._raise_failure()
        if self.threaded:
            self.queue.put(batch)
        else:
            self._write(batch)

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        if self.threaded:
            self.queue.put(None)
            self.thread.join()
        if exc_type is None:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        for batch in iter(self.queue.get, None):
            if self.error is None:  # after a failure, only drain the queue so that the main thread never blocks
                try:
                    self._write(batch)
                except BaseException as error:  # noqa: B036 -- handed to the main thread, which raises it
                    self.error = error

    def _write(self, batch: _Batch) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        errors = list(batch.errors)
        for k in np.flatnonzero(batch.non_finite.numpy()):
            errors[k] = errors[k] or (f"{self.samples[batch.start + k].image_path}: the backbone gave NaN or inf "
                                      f"features for this image")
        failed = [error for error in errors if error]
        if failed and not self.skip_bad:
            raise FishsegError(f"{failed[0]} (pass `skip_bad=True` to leave such images out; finished batches "
                               f"are kept)")
        for error in failed:
            logger.warning("skipped: %s", error)
        previews = batch.previews.numpy()
        features = {name: grids.numpy() for name, grids in batch.features.items()}
        self.store.write(batch.start, batch.stop, **features, masks=batch.masks.numpy(), previews=previews,
                         thumbnails=thumbnails(previews), errors=np.array(errors, dtype=str))
        self.progress.update(batch.stop - batch.start)


def _extract_batches(store: PartStore, samples: list[Sample], backbone: Backbone, config: ExtractConfig,
                     num_workers: int, skip_bad: bool, ranks: Ranks) -> None:
    """Compute this rank's unfinished batches (all of them without torchrun)."""
    finished = set(store.done())
    mine = ranks.shard(store.batches())
    todo = [batch for batch in mine if batch not in finished]
    loader = torch.utils.data.DataLoader(
        ExtractionDataset(samples, config.image_size, config.preview_size, mask_reader(config)),
        batch_sampler=[list(range(start, stop)) for start, stop in todo], num_workers=num_workers,
        pin_memory=backbone.device.type == "cuda", prefetch_factor=4 if num_workers else None,
    )
    total = sum(stop - start for start, stop in mine)
    done = total - sum(stop - start for start, stop in todo)
    with tqdm(total=total, initial=done, unit="img", desc="extract", dynamic_ncols=True,
              disable=not ranks.main) as progress, \
            _PartWriter(store, samples, skip_bad, progress, backbone.device.type in THREADED_WRITES) as writer:
        for (start, stop), (images, masks, previews, errors) in zip(todo, loader):
            writer.put(_compute(backbone, config, start, stop, images, masks, previews, list(errors)))


def _assemble(store: PartStore, out: Path, config: ExtractConfig, backbone: Backbone, samples: list[Sample],
              compression: str, data_root: Path) -> int:
    """Copy the parts, minus skipped images, into the final cache with their near-duplicate groups;
    returns how many were skipped. With classes, masks of one class everywhere are refused before the cache is
    put in place, and the parts go with the refusal: the masks must change, and with them the files the parts
    were made from."""
    errors, thumbs = [], []
    for batch in store.batches():  # first pass, small arrays only: which images are kept, and their thumbnails
        part = store.read(*batch, "errors", "thumbnails")
        errors.append(part["errors"])
        thumbs.append(part["thumbnails"][part["errors"] == ""])
    errors = np.concatenate(errors)
    kept = [sample for sample, error in zip(samples, errors) if not error]
    if not kept:
        raise FishsegError(f"no image under the data root could be read; nothing to write to {out}")
    skipped = [(sample.image_id, str(error)) for sample, error in zip(samples, errors) if error]
    groups = near_duplicate_groups(np.concatenate(thumbs))
    logger.info("%d near-duplicate groups among %d images", len(np.unique(groups)), len(kept))
    with disk_errors(out), CacheWriter(out, config, backbone.info, kept, compression, skipped, groups,
                                       backbone.num_blocks) as writer:
        writer.file.attrs["precision"] = store.manifest["precision"]
        position = 0
        for batch in store.batches():
            part = store.read(*batch)
            ok = part["errors"] == ""
            views = {view: part[feature_name(view)][ok] for view in config.views}
            writer.write(position, part["features"][ok], part["masks"][ok], part["previews"][ok], views)
            position += int(ok.sum())
        _check_classes(writer, out, data_root)
    return len(skipped)


def _check_classes(writer: CacheWriter, out: Path, data_root: Path) -> None:
    """With classes, refuse masks of one class everywhere (the written cache is left unsealed, and removed)."""
    if writer.classes.binary:
        return
    try:
        check_classes_present(writer.image_class_pixels.sum(0), writer.classes, data_root)
    except FishsegError:
        discard_parts(out)
        raise


def run_extraction(data_root: Path, out: Path, config: ExtractConfig, *, batch_size: int | None = None,
                   num_workers: int | None = None, device: str = "auto", compression: str = DEFAULT_COMPRESSION,
                   overwrite: bool = False, skip_bad: bool = False) -> Path:
    """Extract patch grids, masks and previews for every sample under ``data_root`` into ``out``.

    Masks are read as ``config.mask_format`` says (``fishseg.data.labels``); with classes, masks of one class in
    every pixel of every image are refused before the cache is written. An existing finished cache is checked and kept (up to date) or refused (stale, other settings)
    unless ``overwrite``; an interrupted extraction into ``out`` is resumed. ``batch_size`` and ``num_workers``
    None: chosen for the device (``runtime.default_batch_size``, ``runtime.default_num_workers``).
    """
    check_compression(compression)
    if out.is_dir():
        raise FishsegError(f"{out}: is a folder; `out` is the .h5 file to write, e.g. {out / 'cache.h5'}")
    config = dataclasses.replace(config, backbone=backbone_reference(config.backbone))
    samples = discover_samples(data_root)
    check_layout_classes(config, samples, data_root)
    if out.exists() and not is_cache(out):
        if not overwrite:
            raise FishsegError(f"{out}: exists and is not a fishseg cache, so fishseg extract will not touch it; "
                               f"choose another `out`, or pass `overwrite=True` to replace it")
        logger.warning("%s is not a fishseg cache; `overwrite=True` replaces it", out)
    elif out.exists() and not overwrite:
        check_existing(out, config, samples)
        discard_parts(out)  # left behind by a run killed between finishing the cache and cleaning up
        logger.info("%s is up to date (%d images); nothing to do", out, len(samples))
        return out
    with distributed.session(resolve_device(device)) as (ranks, torch_device):
        return _extract(data_root, out, config, samples, ranks, torch_device, batch_size=batch_size,
                        num_workers=num_workers, compression=compression, overwrite=overwrite, skip_bad=skip_bad)


def _extract(data_root: Path, out: Path, config: ExtractConfig, samples: list[Sample], ranks: Ranks,
             torch_device: torch.device, *, batch_size: int | None, num_workers: int | None, compression: str,
             overwrite: bool, skip_bad: bool) -> Path:
    """Each rank computes its contiguous shard of batches into the part store; rank 0 assembles the cache."""
    backbone = load_backbone(config.backbone, config.mean, config.std, torch_device)
    check_settings(config, backbone.info.patch_size, backbone.num_blocks)
    if backbone.info.random_init:
        logger.warning("backbone %s is RANDOM-INIT: its features carry no pretrained knowledge", config.backbone)
    batch_size = default_batch_size(torch_device) if batch_size is None else batch_size
    manifest = {"fishseg_version": __version__, "extract_config": dataclasses.asdict(config),
                "backbone": dataclasses.asdict(backbone.info), "batch_size": batch_size,
                "precision": active_precision(torch_device).backbone_name,
                "image_ids": [s.image_id for s in samples], "sources": [list(s.source_stat) for s in samples]}
    if ranks.main:
        make_output_dir(out.parent)
        store = PartStore.open(out, manifest, discard_other=overwrite)
    ranks.barrier()  # the manifest exists before the other ranks check it
    if not ranks.main:
        store = PartStore.open(out, manifest)
    workers = default_num_workers(torch_device, ranks.local) if num_workers is None else num_workers
    logger.info("extracting %s with %s on %s (batch %d, %s%s); progress is kept in %s",
                plural(len(samples), "image"), config.backbone, torch_device, batch_size, plural(workers, "worker"),
                f", rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else "", parts_dir(out))
    try:
        _extract_batches(store, samples, backbone, config, workers, skip_bad, ranks)
    except FishsegError:
        if not store.done() and ranks.world == 1:  # nothing worth resuming: leave nothing behind
            discard_parts(out)
        raise
    ranks.barrier()  # every shard is written
    if ranks.main:
        n_skipped = _assemble(store, out, config, backbone, samples, compression, data_root)
        discard_parts(out)
        logger.info("wrote %s (%s%s)", out, plural(len(samples) - n_skipped, "image"),
                    f", {n_skipped} skipped" if n_skipped else "")
    ranks.barrier()  # the cache is whole before any process returns: each may read it (fishseg.extract's result)
    return out
