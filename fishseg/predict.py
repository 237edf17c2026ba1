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
from PIL import Image
from tqdm import tqdm

from fishseg.backbone import Backbone, load_backbone
from fishseg.config import BackboneInfo, ExtractConfig, from_json
from fishseg.data import ImageDataset, collect_images, read_rgb
from fishseg.decoders import segment, uses_image
from fishseg.errors import FishsegError
from fishseg.metrics import THRESHOLD
from fishseg.runs import checkpoint_layers, load_run
from fishseg.runtime import (atomic_path, autocast, default_num_workers, make_output_dir, removed_on_error,
                             resolve_device)

logger = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
CSV_HEADER = ["file", "mask", "width", "height", "foreground_fraction", "area_px", "bbox_x0", "bbox_y0", "bbox_x1",
              "bbox_y1", "mean_probability", "error"]
OVERLAY_COLOUR, OVERLAY_ALPHA = (46, 204, 64), 0.45


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
    probability over the predicted fish (empty cells when nothing was found). ``probability`` is uint8, 255 = 1."""
    height, width = mask.shape
    area = int(mask.sum())
    if area == 0:
        return [width, height, "0.000000", 0, "", "", "", "", ""]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [width, height, f"{area / mask.size:.6f}", area, int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]),
            f"{float(probability[mask].mean()) / 255:.6f}"]


def full_size(probability: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """S×S probabilities → H×W uint8 probabilities (255 = 1) at the photo's (width, height), bilinear.

    One byte a photo pixel: upsampling float32 tensors to a 6000×4000 photo cost about 2 GB.
    """
    low = (probability.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BILINEAR))


def tint(photo: Image.Image, mask: np.ndarray) -> Image.Image:
    """Tint the predicted fish on ``photo`` in place (Pillow blends the colour in: no full-size float copy)."""
    photo.paste(OVERLAY_COLOUR, mask=Image.fromarray(mask * np.uint8(round(OVERLAY_ALPHA * 255))))
    return photo


def _write_outputs(out_dir: Path, name: str, source: Path, probability: torch.Tensor) -> list[Any]:
    """Mask and overlay PNGs of one photo at its own size; returns its CSV cells after the file name."""
    photo = read_rgb(source)
    full = full_size(probability, photo.size)
    mask = full > THRESHOLD * 255
    with atomic_path(out_dir / "masks" / f"{name}.png") as tmp:
        Image.fromarray(mask * np.uint8(255)).save(tmp, format="PNG")
    with atomic_path(out_dir / "overlays" / f"{name}.png") as tmp:
        tint(photo, mask).save(tmp, format="PNG")
    return [f"masks/{name}.png", *describe_mask(full, mask), ""]


def _probabilities(model: Backbone, decoder: torch.nn.Module, images: torch.Tensor, previews: torch.Tensor,
                   size: int, layers: tuple[int, ...]) -> torch.Tensor:
    """B×S×S foreground probabilities of uint8 images B×3×S×S, the decoder reading the backbone's ``layers``;
    their previews B×P×P×3 guide a decoder that uses the image."""
    guides = previews.to(model.device) if uses_image(decoder) else None
    with autocast(model.device, "decoder"):
        return torch.sigmoid(segment(decoder, model(images, layers), size, guides).float())


def run_prediction(run_dir: Path, inputs: list[Path], out_dir: Path, *, backbone: str | None = None,
                   batch_size: int = 8, num_workers: int | None = None, device: str = "auto",
                   skip_bad: bool = False) -> tuple[Path, list[str]]:
    """Predict every image in ``inputs`` (files or folders); returns the path of predictions.csv and the errors
    of the images left out (``skip_bad``; without it the first unreadable image stops the run)."""
    record, decoder, meta = load_run(run_dir)
    paths = collect_images(inputs)
    config = from_json(ExtractConfig, json.dumps(record.extract_config))
    torch_device = resolve_device(device)
    model = load_backbone(backbone or record.backbone["name"], config.mean, config.std, torch_device)
    check_backbone(model.info, record.backbone)
    decoder.eval().to(torch_device)
    workers = default_num_workers(torch_device) if num_workers is None else num_workers
    dataset = ImageDataset(paths, config.image_size, config.preview_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch_device.type == "cuda")
    with removed_on_error(out_dir):
        make_output_dir(out_dir)
        rows, skipped = _predict_all(model, decoder, loader, paths, out_dir, config.image_size,
                                     checkpoint_layers(meta), skip_bad)
        with atomic_path(out_dir / PREDICTIONS_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([CSV_HEADER, *rows])
    return out_dir / PREDICTIONS_CSV, skipped


def _predict_all(model: Backbone, decoder: torch.nn.Module, loader: torch.utils.data.DataLoader, paths: list[Path],
                 out_dir: Path, image_size: int, layers: tuple[int, ...],
                 skip_bad: bool) -> tuple[list[list[Any]], list[str]]:
    """Write every photo's mask and overlay; returns the CSV rows and the errors of the images left out."""
    names, rows, skipped, start = _unique_names(paths), [], [], 0
    with tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True) as progress, torch.inference_mode():
        for images, previews, errors in loader:
            failed = [error for error in errors if error]
            if failed and not skip_bad:
                raise FishsegError(f"{failed[0]} (pass --skip-bad to leave such images out)")
            good = [k for k, error in enumerate(errors) if not error]
            probabilities = iter(_probabilities(model, decoder, images[good], previews[good], image_size, layers)
                                 if good else ())
            for source, name, error in zip(paths[start:], names[start:], errors):
                cells = [*[""] * (len(CSV_HEADER) - 2), error] if error else _write_outputs(
                    out_dir, name, source, next(probabilities))
                rows.append([str(source), *cells])
            skipped += failed
            start += len(images)
            progress.update(len(images))
    return rows, skipped
