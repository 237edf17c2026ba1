"""Predict masks for new images with a trained run: backbone + decoder, masks at each image's size.

Writes ``masks/NAME.png`` (0/255, the image's own resolution), ``overlays/NAME.png`` and
``predictions.csv`` into the output folder; names come from the input file names only, so nothing is
written outside it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fishseg.backbone import load_backbone
from fishseg.config import BackboneInfo, ExtractConfig, from_json
from fishseg.data import ImageDataset, collect_images, read_rgb
from fishseg.decoders import segment
from fishseg.errors import FishsegError
from fishseg.metrics import THRESHOLD
from fishseg.runs import load_run
from fishseg.runtime import atomic_path, autocast, default_num_workers, resolve_device

logger = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
CSV_HEADER = ["file", "mask", "width", "height", "foreground_fraction", "area_px", "bbox_x0", "bbox_y0", "bbox_x1",
              "bbox_y1", "mean_probability"]
OVERLAY_COLOUR, OVERLAY_ALPHA = np.array([46, 204, 64]), 0.45


def check_backbone(loaded: BackboneInfo, trained: dict[str, Any]) -> None:
    """Refuse a backbone whose architecture or weights kind differs from the run's."""
    differing = [name for name, value in dataclasses.asdict(loaded).items()
                 if name != "name" and trained.get(name) != value]
    if differing:
        details = "; ".join(f"{name} {trained.get(name)} → {getattr(loaded, name)}" for name in differing)
        raise FishsegError(f"backbone {loaded.name} differs from the one the run was trained on "
                           f"({trained['name']}): {details}")
    if loaded.name != trained["name"]:
        logger.warning("backbone %s has the architecture of %s, which the run was trained on", loaded.name,
                       trained["name"])


def _unique_names(paths: list[Path]) -> list[str]:
    """Output file names from input stems; a repeated stem gets -2, -3, …"""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(f"{path.stem}-{seen[path.stem]}" if seen[path.stem] > 1 else path.stem)
    return names


def describe_mask(probability: np.ndarray, mask: np.ndarray) -> list[Any]:
    """CSV cells: width, height, foreground fraction, area, bounding box (x0 y0 x1 y1, inclusive), mean
    probability over the predicted fish (empty cells when nothing was found)."""
    height, width = mask.shape
    area = int(mask.sum())
    if area == 0:
        return [width, height, "0.000000", 0, "", "", "", "", ""]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [width, height, f"{area / mask.size:.6f}", area, int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]),
            f"{float(probability[mask].mean()):.6f}"]


def _write_outputs(out_dir: Path, name: str, source: Path, probability: np.ndarray) -> np.ndarray:
    mask = probability > THRESHOLD
    with atomic_path(out_dir / "masks" / f"{name}.png") as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    photo = np.asarray(read_rgb(source), dtype=np.float64)
    photo[mask] = (1 - OVERLAY_ALPHA) * photo[mask] + OVERLAY_ALPHA * OVERLAY_COLOUR
    with atomic_path(out_dir / "overlays" / f"{name}.png") as tmp:
        Image.fromarray(photo.astype(np.uint8)).save(tmp, format="PNG")
    return mask


def run_prediction(run_dir: Path, inputs: list[Path], out_dir: Path, *, backbone: str | None = None,
                   batch_size: int = 8, num_workers: int | None = None, device: str = "auto") -> Path:
    """Predict every image in ``inputs`` (files or folders); returns the path of predictions.csv."""
    record, decoder, _ = load_run(run_dir)
    paths = collect_images(inputs)
    config = from_json(ExtractConfig, json.dumps(record.extract_config))
    torch_device = resolve_device(device)
    model = load_backbone(backbone or record.backbone["name"], config.mean, config.std, torch_device)
    check_backbone(model.info, record.backbone)
    decoder.eval().to(torch_device)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(ImageDataset(paths, config.image_size), batch_size=batch_size,
                                         num_workers=workers, pin_memory=torch_device.type == "cuda")
    names, rows, position = _unique_names(paths), [], 0
    with tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True) as progress, torch.inference_mode():
        for images, sizes, errors in loader:
            failed = [error for error in errors if error]
            if failed:
                raise FishsegError(failed[0])
            with autocast(torch_device):
                probabilities = torch.sigmoid(segment(decoder, model(images), config.image_size).float())
            for probability, (width, height) in zip(probabilities, sizes.tolist()):
                full = F.interpolate(probability[None, None], size=(height, width), mode="bilinear",
                                     align_corners=False)[0, 0].cpu().numpy()
                name, source = names[position], paths[position]
                mask = _write_outputs(out_dir, name, source, full)
                rows.append([str(source), f"masks/{name}.png", *describe_mask(full, mask)])
                position += 1
            progress.update(len(images))
    with atomic_path(out_dir / PREDICTIONS_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([CSV_HEADER, *rows])
    return out_dir / PREDICTIONS_CSV
