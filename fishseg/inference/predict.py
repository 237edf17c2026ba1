"""Predict masks for new images with a trained run: backbone + decoder, masks at each image's size.

Writes ``masks/NAME.png`` (0/255, the image's own resolution), ``overlays/NAME.png`` and
``predictions.csv`` into the output folder; names come from the input file names only, so nothing is
written outside it. The CSV lists every mask written, and is how a later ``--overwrite`` knows which
files are fishseg's: rows and files always agree, and no other file is touched.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fishseg.config import BackboneInfo, ExtractConfig, from_json
from fishseg.data.images import ImageDataset, collect_images, read_rgb
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import THRESHOLD
from fishseg.formats.runs import RunFolder
from fishseg.models.backbone import Backbone, load_backbone
from fishseg.models.decoders import segment, uses_image
from fishseg.runtime import (atomic_path, autocast, default_num_workers, make_output_dir, plural, removed_on_error,
                             resolve_device)

logger = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
OUTPUT_DIRS = ("masks", "overlays")  # each holds NAME.png for every image predicted
CSV_HEADER = ["file", "mask", "width", "height", "foreground_fraction", "area_px", "bbox_x0", "bbox_y0", "bbox_x1",
              "bbox_y1", "mean_probability", "error"]
OVERLAY_COLOUR, OVERLAY_ALPHA = (46, 204, 64), 0.45


def check_backbone(loaded: BackboneInfo, trained: dict[str, Any]) -> None:
    """Refuse a backbone other than the one the run was trained on: another architecture, or the same one with
    other weights. A run whose cache did not record the weights (older caches) is checked as far as it can be,
    with a warning that the weights were not."""
    recorded = from_json(BackboneInfo, json.dumps(trained))
    differing = [f"{name} {value} → {loaded.architecture[name]}" for name, value in recorded.architecture.items()
                 if value is not None and value != loaded.architecture[name]]
    if not differing and recorded.weights_sha256 is not None and recorded.weights_sha256 != loaded.weights_sha256:
        differing = [f"same architecture, other weights (sha256 {recorded.weights_sha256[:8]}… → "
                     f"{loaded.weights_sha256[:8]}…)"]
    if not differing and recorded.random_init != loaded.random_init:
        differing = [f"same architecture, other weights ({_weights_kind(recorded)} → {_weights_kind(loaded)})"]
    if differing:
        raise FishsegError(f"backbone {loaded.name} differs from the one the run was trained on ({recorded.name}): "
                           f"{'; '.join(differing)}; pass as `backbone` the model its cache was extracted with")
    if recorded.weights_sha256 is None:
        logger.warning("backbone %s: the run's cache did not record the weights of %s (made by an older fishseg), "
                       "so only the architecture could be checked", loaded.name, recorded.name)


def _weights_kind(info: BackboneInfo) -> str:
    return "random-init" if info.random_init else "pretrained"


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
    masks, overlays = _outputs(out_dir, name)
    with atomic_path(masks) as tmp:
        Image.fromarray(mask * np.uint8(255)).save(tmp, format="PNG")
    with atomic_path(overlays) as tmp:
        tint(photo, mask).save(tmp, format="PNG")
    return [masks.relative_to(out_dir).as_posix(), *describe_mask(full, mask), ""]


def _outputs(out_dir: Path, name: str) -> list[Path]:
    """The files predicting a photo under ``name`` writes: its mask, then its overlay."""
    return [out_dir / folder / f"{name}.png" for folder in OUTPUT_DIRS]


def _remove_outputs(out_dir: Path, names: list[str]) -> None:
    """Remove the masks and overlays of ``names``, then the folders they leave empty."""
    for name in names:
        for path in _outputs(out_dir, name):
            path.unlink(missing_ok=True)
    for folder in OUTPUT_DIRS:
        if (out_dir / folder).is_dir() and not any((out_dir / folder).iterdir()):
            (out_dir / folder).rmdir()


def _earlier_predictions(out_dir: Path, overwrite: bool) -> list[str]:
    """The names of the photos an earlier prediction into ``out_dir`` wrote, as its predictions.csv lists them
    (to remove before writing: ``overwrite``). Refused: earlier predictions without ``overwrite``, and masks/ or
    overlays/ holding files that no predictions.csv lists (not fishseg's, or left by a killed run), which new
    files could replace or be mixed with."""
    csv_path = out_dir / PREDICTIONS_CSV
    names = _listed_names(csv_path) if csv_path.is_file() else []
    listed = {path for name in names for path in _outputs(out_dir, name)}
    others = sorted(path for folder in OUTPUT_DIRS if (out_dir / folder).is_dir()
                    for path in (out_dir / folder).iterdir() if path not in listed)
    if others:
        raise FishsegError(f"{out_dir}: {plural(len(others), 'file')} in {'/, '.join(OUTPUT_DIRS)}/ that no "
                           f"{PREDICTIONS_CSV} lists (e.g. {others[0].relative_to(out_dir)}); predict writes "
                           f"there: choose another `out`, or move them away")
    if csv_path.is_file() and not overwrite:
        raise FishsegError(f"{out_dir}: holds earlier predictions ({PREDICTIONS_CSV}, {plural(len(names), 'mask')} "
                           f"and overlay{'s' if len(names) != 1 else ''}); pass `overwrite=True` to replace them, "
                           f"or choose another `out`")
    return names


def _listed_names(csv_path: Path) -> list[str]:
    """The names whose masks ``csv_path`` lists (rows of images left out list none)."""
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            masks = [row["mask"] for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError) as error:
        raise FishsegError(f"{csv_path}: not a fishseg {PREDICTIONS_CSV} ({error}); choose another `out`") from None
    names = [PurePosixPath(mask) for mask in masks if mask]
    strays = [str(path) for path in names if path.parent != PurePosixPath(OUTPUT_DIRS[0]) or path.suffix != ".png"]
    if strays:
        raise FishsegError(f"{csv_path}: lists {strays[0]}, which is not a mask fishseg writes; choose another `out`")
    return [path.stem for path in names]


def _probabilities(model: Backbone, decoder: torch.nn.Module, images: torch.Tensor, previews: torch.Tensor,
                   size: int, layers: tuple[int, ...]) -> torch.Tensor:
    """B×S×S foreground probabilities of uint8 images B×3×S×S, the decoder reading the backbone's ``layers``;
    their previews B×P×P×3 guide a decoder that uses the image."""
    guides = previews.to(model.device) if uses_image(decoder) else None
    with autocast(model.device, "decoder"):
        return torch.sigmoid(segment(decoder, model(images, layers), size, guides).float())


def run_prediction(run_dir: Path, inputs: list[Path], out_dir: Path, *, backbone: str | None = None,
                   batch_size: int = 8, num_workers: int | None = None, device: str = "auto",
                   skip_bad: bool = False, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Predict every image in ``inputs`` (files or folders); returns the path of predictions.csv and the errors
    of the images left out (``skip_bad``; without it the first unreadable image stops the run). Earlier
    predictions in ``out_dir`` are refused, or replaced with ``overwrite``; a failed or interrupted prediction
    removes what it wrote."""
    record, decoder, meta = RunFolder(run_dir).load()
    RunFolder(out_dir).require_no_kind("predictions")
    paths = collect_images(inputs)
    earlier = _earlier_predictions(out_dir, overwrite)
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
        _remove_outputs(out_dir, earlier)  # the files first: an interruption leaves no file the CSV does not list
        (out_dir / PREDICTIONS_CSV).unlink(missing_ok=True)
        names = _unique_names(paths)
        try:
            rows, skipped = _predict_all(model, decoder, loader, paths, names, out_dir, config.image_size,
                                         meta.layers, skip_bad)
            with atomic_path(out_dir / PREDICTIONS_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([CSV_HEADER, *rows])
        except BaseException:  # Ctrl-C too: nothing resumes a prediction, and files no CSV lists block the next one
            _remove_outputs(out_dir, names)
            raise
    return out_dir / PREDICTIONS_CSV, skipped


def _predict_all(model: Backbone, decoder: torch.nn.Module, loader: torch.utils.data.DataLoader, paths: list[Path],
                 names: list[str], out_dir: Path, image_size: int, layers: tuple[int, ...],
                 skip_bad: bool) -> tuple[list[list[Any]], list[str]]:
    """Write every photo's mask and overlay under its name; returns the CSV rows and the errors of the images
    left out."""
    rows, skipped, start = [], [], 0
    with tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True) as progress, torch.inference_mode():
        for images, previews, errors in loader:
            failed = [error for error in errors if error]
            if failed and not skip_bad:
                raise FishsegError(f"{failed[0]} (pass `skip_bad=True` to leave such images out)")
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
