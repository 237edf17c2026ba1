"""Stage 1: run the frozen backbone once over a dataset and write the HDF5 cache."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from fishseg.backbone import load_backbone
from fishseg.cache import CacheWriter
from fishseg.config import DEFAULT_COMPRESSION, ExtractConfig
from fishseg.data import ExtractionDataset, discover_samples
from fishseg.errors import FishsegError
from fishseg.runtime import default_num_workers, resolve_device

logger = logging.getLogger(__name__)


def run_extraction(data_root: Path, out: Path, config: ExtractConfig, *, batch_size: int = 8,
                   num_workers: int | None = None, device: str = "auto", compression: str = DEFAULT_COMPRESSION,
                   overwrite: bool = False) -> Path:
    """Extract patch grids, masks and previews for every sample under ``data_root`` into ``out``."""
    if out.exists() and not overwrite:
        raise FishsegError(f"{out}: cache already exists; pass --overwrite to replace it")
    samples = discover_samples(data_root)
    torch_device = resolve_device(device)
    backbone = load_backbone(config.backbone, config.mean, config.std, torch_device)
    if config.image_size % backbone.info.patch_size:
        raise FishsegError(
            f"--image-size {config.image_size}: not divisible by the backbone's patch size "
            f"{backbone.info.patch_size}; try {config.image_size // backbone.info.patch_size * backbone.info.patch_size}"
        )
    if backbone.info.random_init:
        logger.warning("backbone %s is RANDOM-INIT: its features carry no pretrained knowledge", config.backbone)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        ExtractionDataset(samples, config.image_size, config.preview_size),
        batch_size=batch_size, num_workers=workers, pin_memory=torch_device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    logger.info("extracting %d images with %s on %s (%d workers)", len(samples), config.backbone,
                torch_device, workers)
    with CacheWriter(out, config, backbone.info, samples, compression) as writer, \
            tqdm(total=len(samples), unit="img", desc="extract", dynamic_ncols=True) as progress:
        start = 0
        for images, masks, previews in loader:
            features = backbone(images).cpu().numpy()
            writer.write(start, features, masks.numpy(), previews.numpy())
            start += len(images)
            progress.update(len(images))
    logger.info("wrote %s", out)
    return out
