"""The in-memory predictor: a trained run's backbone and decoder loaded once, then photos in, masks out.

    segmenter = Segmenter.from_run("runs/progressive")
    result = segmenter("photo.jpg")  # a path, a PIL image or an H×W×3 uint8 array; a list of them gives a list
    result.mask                      # H×W bool, the photo's own size
    result.probabilities             # H×W float32 in [0, 1]
    result.labels                    # H×W uint8 class indices (a run with several classes: which class is where)
    result.class_probabilities       # C×H×W float32, summing to 1 over the classes

It returns exactly what ``fishseg predict`` writes, predict being a file writer on top of it: the photo resized to
the run's image size as extraction resized it (and its preview made as the cache's, for a decoder that uses the
image), the decoder's probabilities upsampled bilinearly to the photo's size in steps of 1/255, and the fish where
the probability exceeds evaluation.metrics.THRESHOLD. A run with several classes (``extract --classes``) gives each
class's probability (the softmax over the classes) upsampled bilinearly, and each pixel's class is their arg max.

Inputs. A path (str or Path) is read as predict reads files: EXIF orientation applied, any mode converted to RGB
(16-bit grayscale scaled). A PIL image of any mode is converted the same way, as it is (no EXIF rotation: the mask
fits the picture held). An array must be H×W×3 uint8 RGB: grayscale (H×W), RGBA and float arrays are refused rather
than guessed (an H×W array is as likely a mask as a gray photo; floats may be 0..1 or 0..255); the message says how
to convert them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from fishseg.classes import Classes
from fishseg.config import LAST_BLOCK, ExtractConfig, check_precision, from_json, shown
from fishseg.data.images import as_rgb, prediction_inputs, read_rgb
from fishseg.drawing import OVERLAY_ALPHA, OVERLAY_COLOUR, label_image, overlay, tint
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import THRESHOLD
from fishseg.formats.runs import RunFolder, RunRecord
from fishseg.models.backbone import Backbone, check_backbone, load_backbone
from fishseg.models.decoders import segment, uses_image
from fishseg.runtime import autocast, precision_policy, precision_scope, resolve_device

__all__ = ["OVERLAY_ALPHA", "OVERLAY_COLOUR", "ImageInput", "Segmentation", "Segmenter", "bilinear", "full_size",
           "tint"]  # OVERLAY_* and tint: fishseg.drawing's, named here as before

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]  # one photo, as Segmenter takes it


def full_size(probability: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """S×S probabilities → H×W uint8 probabilities (255 = 1) at the photo's (width, height), bilinear.

    One byte a photo pixel: upsampling float32 tensors to a 6000×4000 photo cost about 2 GB.
    """
    low = (probability.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BILINEAR))


def bilinear(probability: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """S×S float32 probabilities → H×W float32 at the photo's (width, height), bilinear (PIL's, as full_size)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(probability, np.float32)).resize(
        size, Image.Resampling.BILINEAR))


@dataclasses.dataclass(frozen=True, eq=False)
class Segmentation:
    """One photo's prediction at the photo's own size.

    Binary runs: ``probabilities`` H×W float32 in [0, 1] (steps of 1/255) and ``mask`` H×W bool, the fish: the
    pixels whose probability exceeds THRESHOLD. Several classes: ``labels`` H×W uint8, each pixel's class index
    (the arg max of ``class_probabilities``, C×H×W float32 summing to 1 over C, each class's probabilities
    upsampled bilinearly from the decoder's softmax); ``mask`` is then every pixel not of the background (class
    0) and ``probabilities`` one minus the background's probability. Every segmentation has ``classes``,
    ``labels``, ``class_probabilities`` and ``area_px_by_class`` (binary: background and fish)."""

    mask: np.ndarray
    probabilities: np.ndarray
    classes: Classes = Classes()  # what the labels mean
    labels: np.ndarray | None = dataclasses.field(default=None, repr=False)  # H×W uint8; None (binary): the mask
    coarse: np.ndarray | None = dataclasses.field(default=None, repr=False)  # several classes: C×S×S probabilities

    def __post_init__(self) -> None:
        mask, probabilities = self.mask, self.probabilities
        if not (mask.dtype == bool and probabilities.dtype == np.float32 and mask.ndim == 2
                and mask.shape == probabilities.shape):
            raise ValueError(f"expected an H×W bool mask and H×W float32 probabilities, got {mask.dtype} "
                             f"{mask.shape} and {probabilities.dtype} {probabilities.shape}")
        if self.labels is None and self.classes.binary:
            object.__setattr__(self, "labels", mask.astype(np.uint8))
        self._check_classes()

    def _check_classes(self) -> None:
        """H×W uint8 labels; C×S×S float32 coarse probabilities with several classes, none for binary."""
        labels, coarse = self.labels, self.coarse
        if labels is None or labels.dtype != np.uint8 or labels.shape != self.mask.shape:
            raise ValueError(f"expected H×W uint8 labels of the mask's shape {self.mask.shape}, got "
                             f"{'none' if labels is None else f'{labels.dtype} {labels.shape}'}")
        expected = (coarse is None) if self.classes.binary else (
            coarse is not None and coarse.ndim == 3 and coarse.shape[0] == len(self.classes)
            and coarse.dtype == np.float32)
        if not expected:
            raise ValueError(f"expected C×S×S float32 class probabilities (C = {len(self.classes)}) for several "
                             f"classes and none for binary, got {None if coarse is None else coarse.shape}")

    @classmethod
    def upsampled(cls, probability: torch.Tensor, size: tuple[int, int], classes: Classes = Classes()
                  ) -> Segmentation:
        """From the decoder's S×S probabilities (several classes: C×S×S), upsampled to the photo's ``size``
        (width, height)."""
        if classes.binary:
            levels = full_size(probability, size)
            return cls(levels > THRESHOLD * 255, levels.astype(np.float32) / np.float32(255))
        coarse = probability.float().cpu().numpy()
        background = bilinear(coarse[0], size)
        best, labels = background.copy(), np.zeros(background.shape, np.uint8)
        for index, channel in enumerate(coarse[1:], start=1):  # one class at a time: two H×W floats, not C
            upsampled = bilinear(channel, size)
            labels[upsampled > best] = index  # ties keep the lower index, as argmax does
            np.maximum(best, upsampled, out=best)
        return cls(labels > 0, 1 - background, classes, labels, coarse)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL gives a photo's size."""
        return self.mask.shape[1], self.mask.shape[0]

    @functools.cached_property
    def class_probabilities(self) -> np.ndarray:
        """C×H×W float32: each class's probability at each pixel, summing to 1 over C (binary: background, fish).
        Made when first asked for: C floats a photo pixel."""
        if self.classes.binary:
            return np.stack([1 - self.probabilities, self.probabilities])
        return np.stack([bilinear(channel, self.size) for channel in self.coarse])

    @property
    def area_px_by_class(self) -> dict[str, int]:
        """Pixels of each class, by class name, in class order (summing to the photo's pixels)."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.classes))
        return {name: int(count) for name, count in zip(self.classes.names, counts)}

    @property
    def area_px(self) -> int:
        """Fish pixels (several classes: the pixels of every class but the background)."""
        return int(self.mask.sum())

    @property
    def fish_fraction(self) -> float:
        """The share of the photo's pixels that are fish, in [0, 1]."""
        return self.area_px / self.mask.size

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """The fish's bounding box (x0, y0, x1, y1), inclusive; None when no fish was found."""
        if not self.mask.any():
            return None
        rows, cols = np.flatnonzero(self.mask.any(axis=1)), np.flatnonzero(self.mask.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])

    @property
    def mean_probability(self) -> float | None:
        """The mean probability over the fish; None when no fish was found."""
        return float(self.probabilities[self.mask].mean(dtype=np.float64)) if self.mask.any() else None

    def mask_image(self) -> Image.Image:
        """The mask as predict writes masks/NAME.png: binary, mode "L" 0/255; several classes, mode "P" with
        the class indices as values and the class colours as palette (drawing.label_image)."""
        if self.classes.binary:
            return Image.fromarray(self.mask * np.uint8(255))
        return label_image(self.labels, self.classes)

    def overlay(self, image: ImageInput) -> Image.Image:
        """A copy of ``image`` (the photo this was made from, as Segmenter takes it) with the fish tinted (several
        classes: each class in its colour, with a legend beside the photo), as predict's overlays/NAME.png."""
        photo = _photo(image)
        if photo.size != self.size:
            raise FishsegError(f"overlay: the image is {photo.width}×{photo.height} but the mask "
                               f"{self.size[0]}×{self.size[1]}; pass the image this segmentation was made from")
        return overlay(photo.copy(), self.labels, self.classes)


@dataclasses.dataclass(frozen=True, eq=False)
class Segmenter:
    """A trained decoder on its frozen backbone, loaded once: photos in, masks out.

        segmenter = fishseg.Segmenter.from_run("runs/progressive")  # backbone=, device=, precision=, batch_size=
        result = segmenter("photo.jpg")
        result.mask           # H×W bool at the photo's own size: fish where the probability exceeds 0.5
        result.probabilities  # H×W float32 in [0, 1]
        result.labels         # H×W uint8 class indices, of segmenter.classes (several classes: the arg max)

    A photo is a path (str or Path; EXIF orientation applied, any mode converted to RGB), a PIL image (any mode,
    converted to RGB, not rotated) or an H×W×3 uint8 RGB array (grayscale, RGBA and float arrays are refused, the
    message saying how to convert them). A call on one photo returns one ``Segmentation``; on a list, a list of
    them in order, the photos going through the backbone ``batch_size`` at a time (default 8). The results equal
    what ``fishseg.predict`` writes for the same photos."""

    backbone: Backbone = dataclasses.field(repr=False)
    decoder: nn.Module = dataclasses.field(repr=False)  # in eval mode, on the backbone's device
    image_size: int  # S: photos are resized to S×S for the backbone, as the run's cache was extracted
    preview_size: int  # P: the size of the guide photo a decoder that uses the image reads
    record: RunRecord = dataclasses.field(repr=False)  # the run's run.json: where the decoder came from
    layers: tuple[int, ...] = LAST_BLOCK  # the backbone blocks the decoder reads
    precision: str = "auto"  # one of config.PRECISIONS, as fishseg.predict takes it
    batch_size: int = 8  # photos a backbone pass when called on a list
    classes: Classes = Classes()  # what the decoder's outputs mean: binary, or one channel per class

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise FishsegError(f"batch_size {shown(self.batch_size)}: expected a whole number >= 1")

    @classmethod
    def from_run(cls, run_dir: str | Path, backbone: str | None = None, device: str = "auto", *,
                 precision: str = "auto", batch_size: int = 8) -> Segmenter:
        """The best decoder of the run in ``run_dir`` on the backbone its cache was extracted with (``backbone``:
        another copy of it, a Hub id or a folder; any other model is refused)."""
        record, decoder, meta = RunFolder(run_dir).load()
        config = from_json(ExtractConfig, json.dumps(record.extract_config))
        torch_device = resolve_device(device)
        precision_policy(torch_device, precision)  # refused here rather than at the first photo
        model = load_backbone(backbone or record.backbone["name"], config.mean, config.std, torch_device)
        check_backbone(model.info, record.backbone)
        return cls(model, decoder.eval().to(torch_device), config.image_size, config.preview_size, record,
                   meta.layers, precision, batch_size, meta.pixel_classes)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Segmentation | list[Segmentation]:
        """One photo's Segmentation, or a list of them for a list (or tuple) of photos, which go through the
        backbone ``batch_size`` at a time (each decoded when its batch comes)."""
        if not isinstance(images, (list, tuple)):
            return self._segment([_photo(images)])[0]
        return [result for start in range(0, len(images), self.batch_size)
                for result in self._segment([_photo(image) for image in images[start:start + self.batch_size]])]

    def _segment(self, photos: list[Image.Image]) -> list[Segmentation]:
        """RGB photos of any sizes → their Segmentations, in one backbone pass."""
        images, previews = (torch.stack(part) for part in zip(
            *(prediction_inputs(photo, self.image_size, self.preview_size) for photo in photos)))
        return [Segmentation.upsampled(probability, photo.size, self.classes)
                for probability, photo in zip(self.probability_maps(images, previews), photos)]

    def probability_maps(self, images: torch.Tensor, previews: torch.Tensor) -> torch.Tensor:
        """B×S×S float32 fish probabilities (several classes: B×C×S×S class probabilities) at the run's image
        size, of uint8 images B×3×S×S and their previews B×P×P×3 (as data.images.prediction_inputs makes them):
        the forward pass every prediction goes through."""
        guides = previews.to(self.device) if uses_image(self.decoder) else None
        with precision_scope(self.precision), torch.inference_mode(), autocast(self.device, "decoder"):
            return self.forward(images, guides)

    def forward(self, images: torch.Tensor, guides: torch.Tensor | None) -> torch.Tensor:
        """B×S×S float32 fish probabilities of uint8 images B×3×S×S (several classes: B×C×S×S, the softmax over
        the classes), a decoder that uses the image reading its guides B×P×P×3 (None for the others): backbone,
        decoder, sigmoid or softmax, under the caller's precision and grad mode (``probability_maps`` for
        predictions, the exporter's trace for the ONNX graph)."""
        features = self.backbone(images, self.layers)
        logits = segment(self.decoder, features, self.image_size, guides).float()
        return torch.sigmoid(logits) if self.classes.binary else self.classes.probabilities(logits)


def _photo(image: ImageInput) -> Image.Image:
    """One input as the RGB photo predict would decode from its file."""
    if isinstance(image, (str, os.PathLike)):
        photo = read_rgb(Path(image))
    elif isinstance(image, Image.Image):
        photo = as_rgb(image)
    elif isinstance(image, np.ndarray):
        photo = Image.fromarray(_rgb_array(image))
    else:
        raise FishsegError(f"cannot segment a {type(image).__name__}: pass a PIL image, a path or an H×W×3 uint8 "
                           f"numpy array (or a list of them)")
    if 0 in photo.size:
        raise FishsegError(f"an image of {photo.width}×{photo.height} pixels: nothing to segment")
    return photo


def _rgb_array(array: np.ndarray) -> np.ndarray:
    """``array`` if it is an H×W×3 uint8 RGB photo; anything else is refused with how to make one."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise FishsegError(f"image array of shape {array.shape}: expected H×W×3 RGB (from a grayscale array g: "
                           f"np.stack([g] * 3, axis=-1); from RGBA: array[..., :3])")
    if array.dtype != np.uint8:
        raise FishsegError(f"image array of dtype {array.dtype}: expected uint8 RGB values 0..255 (from floats in "
                           f"0..1: (array * 255).round().astype(np.uint8))")
    return np.ascontiguousarray(array)
