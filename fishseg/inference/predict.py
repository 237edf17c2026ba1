"""Predict masks for new images with a trained run, into files: a file writer on top of inference.segmenter.

A Segmenter computes each image's mask at its own size (what ``segmenter(image)`` returns in memory); this
writes ``masks/NAME.png`` (0/255), ``overlays/NAME.png`` and ``predictions.csv`` into the output folder. A run
with several classes writes label PNGs instead (mode "P": the class indices as values, the class colours as
palette), overlays coloured by class with a legend beside the photo, and an ``area_px:<class>`` column per class
in the CSV. Names come from the input file names only, so nothing is written outside it. The CSV lists every mask
written, and is how a later ``--overwrite`` knows which files are fishseg's: rows and files always agree, and no
other file is touched.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from tqdm import tqdm

from fishseg.classes import Classes
from fishseg.data.images import ImageDataset, collect_images, read_rgb
from fishseg.drawing import overlay
from fishseg.errors import FishsegError
from fishseg.formats.runs import RunFolder
from fishseg.inference.segmenter import Segmentation, Segmenter
from fishseg.results import PredictionResult
from fishseg.runtime import (atomic_path, default_num_workers, make_output_dir, plural, removed_on_error,
                             requested_precision)

__all__ = ["AREA_COLUMN", "CSV_HEADER", "OUTPUT_DIRS", "PREDICTIONS_CSV", "csv_header", "run_prediction"]

PREDICTIONS_CSV = "predictions.csv"
OUTPUT_DIRS = ("masks", "overlays")  # each holds NAME.png for every image predicted
CSV_HEADER = ["file", "mask", "width", "height", "foreground_fraction", "area_px", "bbox_x0", "bbox_y0", "bbox_x1",
              "bbox_y1", "mean_probability", "error"]
AREA_COLUMN = "area_px:{}"  # several classes: a column of each class's pixels, before "error"


def csv_header(classes: Classes) -> list[str]:
    """predictions.csv's columns: CSV_HEADER for a binary run; with several classes, an area column per class
    (AREA_COLUMN, the background's included) before "error"."""
    if classes.binary:
        return CSV_HEADER
    return [*CSV_HEADER[:-1], *(AREA_COLUMN.format(name) for name in classes.names), CSV_HEADER[-1]]


def _unique_names(paths: list[Path]) -> list[str]:
    """Output file names from input stems; a repeated stem gets -2, -3, …"""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(f"{path.stem}-{seen[path.stem]}" if seen[path.stem] > 1 else path.stem)
    return names


def _cells(segmentation: Segmentation) -> list[Any]:
    """CSV cells: width, height, foreground fraction, area, bounding box (x0 y0 x1 y1, inclusive), mean
    probability over the predicted fish (empty cells when nothing was found); with several classes, then each
    class's area."""
    width, height = segmentation.size
    areas = [] if segmentation.classes.binary else list(segmentation.area_px_by_class.values())
    if segmentation.bbox is None:
        return [width, height, "0.000000", 0, "", "", "", "", "", *areas]
    return [width, height, f"{segmentation.fish_fraction:.6f}", segmentation.area_px, *segmentation.bbox,
            f"{segmentation.mean_probability:.6f}", *areas]


def _write_outputs(out_dir: Path, name: str, source: Path, probability: torch.Tensor,
                   classes: Classes) -> tuple[Path, list[Any]]:
    """Mask and overlay PNGs of one photo at its own size, from its S×S probabilities (several classes: C×S×S);
    returns the mask's path and the photo's CSV cells after the file name."""
    photo = read_rgb(source)
    segmentation = Segmentation.upsampled(probability, photo.size, classes)
    masks, overlays = _outputs(out_dir, name)
    with atomic_path(masks) as tmp:
        segmentation.mask_image().save(tmp, format="PNG")
    with atomic_path(overlays) as tmp:
        overlay(photo, segmentation.labels, classes).save(tmp, format="PNG")  # drawn on the photo: no copy
    return masks, [masks.relative_to(out_dir).as_posix(), *_cells(segmentation), ""]


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


def run_prediction(run_dir: Path, inputs: list[Path], out_dir: Path, *, backbone: str | None = None,
                   batch_size: int = 8, num_workers: int | None = None, device: str = "auto",
                   skip_bad: bool = False, overwrite: bool = False) -> PredictionResult:
    """Predict every image in ``inputs`` (files or folders) into ``out_dir``, with the precision of the active
    precision_scope. Without ``skip_bad`` the first unreadable image stops the run. Earlier predictions in
    ``out_dir`` are refused, or replaced with ``overwrite``; a failed or interrupted prediction removes what it
    wrote."""
    RunFolder(out_dir).require_no_kind("predictions")
    paths = collect_images(inputs)
    earlier = _earlier_predictions(out_dir, overwrite)
    segmenter = Segmenter.from_run(run_dir, backbone, device, precision=requested_precision(), batch_size=batch_size)
    with removed_on_error(out_dir):
        make_output_dir(out_dir)
        _remove_outputs(out_dir, earlier)  # the files first: an interruption leaves no file the CSV does not list
        (out_dir / PREDICTIONS_CSV).unlink(missing_ok=True)
        names = _unique_names(paths)
        try:
            rows, masks, skipped = _predict_all(segmenter, paths, names, out_dir, num_workers, skip_bad)
            with atomic_path(out_dir / PREDICTIONS_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([csv_header(segmenter.classes), *rows])
        except BaseException:  # Ctrl-C too: nothing resumes a prediction, and files no CSV lists block the next one
            _remove_outputs(out_dir, names)
            raise
    return PredictionResult(out_dir, out_dir / PREDICTIONS_CSV, tuple(masks), tuple(skipped))


def _predict_all(segmenter: Segmenter, paths: list[Path], names: list[str], out_dir: Path, num_workers: int | None,
                 skip_bad: bool) -> tuple[list[list[Any]], list[Path], list[str]]:
    """Write every photo's mask and overlay under its name; returns the CSV rows, the masks written and the errors
    of the images left out. DataLoader workers decode and resize the photos while the device runs the batch
    before: decoding a large JPEG takes longer than a ViT-S pass on a GPU."""
    workers = default_num_workers(segmenter.device) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(ImageDataset(paths, segmenter.image_size, segmenter.preview_size),
                                         batch_size=segmenter.batch_size, num_workers=workers,
                                         pin_memory=segmenter.device.type == "cuda")
    rows, masks, skipped, start = [], [], [], 0
    columns = len(csv_header(segmenter.classes))
    with tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True) as progress:
        for images, previews, errors in loader:
            failed = [error for error in errors if error]
            if failed and not skip_bad:
                raise FishsegError(f"{failed[0]} (pass `skip_bad=True` to leave such images out)")
            good = [k for k, error in enumerate(errors) if not error]
            probabilities = iter(segmenter.probability_maps(images[good], previews[good]) if good else ())
            for source, name, error in zip(paths[start:], names[start:], errors):
                if error:
                    rows.append([str(source), *[""] * (columns - 2), error])
                    continue
                mask, cells = _write_outputs(out_dir, name, source, next(probabilities), segmenter.classes)
                rows.append([str(source), *cells])
                masks.append(mask)
            skipped += failed
            start += len(images)
            progress.update(len(images))
    return rows, masks, skipped
