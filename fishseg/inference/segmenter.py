"""The in-memory predictor: a trained run's backbone and decoder loaded once, then photos in, masks out.

    segmenter = Segmenter.from_run("runs/progressive")
    result = segmenter("photo.jpg")  # a path, a PIL image or an H×W×3 uint8 array; a list of them gives a list
    result.mask                      # H×W bool, the photo's own size
    result.probabilities             # H×W float32 in [0, 1]

It returns exactly what ``fishseg predict`` writes, predict being a file writer on top of it: the photo resized to
the run's image size as extraction resized it (and its preview made as the cache's, for a decoder that uses the
image), the decoder's probabilities upsampled bilinearly to the photo's size in steps of 1/255, and the fish where
the probability exceeds evaluation.metrics.THRESHOLD.

Inputs. A path (str or Path) is read as predict reads files: EXIF orientation applied, any mode converted to RGB
(16-bit grayscale scaled). A PIL image of any mode is converted the same way, as it is (no EXIF rotation: the mask
fits the picture held). An array must be H×W×3 uint8 RGB: grayscale (H×W), RGBA and float arrays are refused rather
than guessed (an H×W array is as likely a mask as a gray photo; floats may be 0..1 or 0..255); the message says how
to convert them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from fishseg.config import LAST_BLOCK, ExtractConfig, check_precision, from_json, shown
from fishseg.data.images import as_rgb, prediction_inputs, read_rgb
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import THRESHOLD
from fishseg.formats.runs import RunFolder, RunRecord
from fishseg.models.backbone import Backbone, check_backbone, load_backbone
from fishseg.models.decoders import segment, uses_image
from fishseg.runtime import autocast, precision_policy, precision_scope, resolve_device

__all__ = ["OVERLAY_ALPHA", "OVERLAY_COLOUR", "ImageInput", "Segmentation", "Segmenter", "full_size", "tint"]

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]  # one photo, as Segmenter takes it
OVERLAY_COLOUR, OVERLAY_ALPHA = (46, 204, 64), 0.45


def full_size(probability: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """S×S probabilities → H×W uint8 probabilities (255 = 1) at the photo's (width, height), bilinear.

    One byte a photo pixel: upsampling float32 tensors to a 6000×4000 photo cost about 2 GB.
    """
    low = (probability.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BILINEAR))


def tint(photo: Image.Image, mask: np.ndarray) -> Image.Image:
    """Tint the fish (H×W bool ``mask``) on the RGB ``photo`` in place (Pillow blends the colour in: no full-size
    float copy)."""
    photo.paste(OVERLAY_COLOUR, mask=Image.fromarray(mask * np.uint8(round(OVERLAY_ALPHA * 255))))
    return photo


@dataclasses.dataclass(frozen=True, eq=False)
class Segmentation:
    """One photo's prediction at the photo's own size: ``probabilities`` H×W float32 in [0, 1] (steps of 1/255)
    and ``mask`` H×W bool, the fish: the pixels whose probability exceeds THRESHOLD."""

    mask: np.ndarray
    probabilities: np.ndarray

    def __post_init__(self) -> None:
        mask, probabilities = self.mask, self.probabilities
        if not (mask.dtype == bool and probabilities.dtype == np.float32 and mask.ndim == 2
                and mask.shape == probabilities.shape):
            raise ValueError(f"expected an H×W bool mask and H×W float32 probabilities, got {mask.dtype} "
                             f"{mask.shape} and {probabilities.dtype} {probabilities.shape}")

    @classmethod
    def upsampled(cls, probability: torch.Tensor, size: tuple[int, int]) -> Segmentation:
        """From the decoder's S×S probabilities, upsampled to the photo's ``size`` (width, height)."""
        levels = full_size(probability, size)
        return cls(levels > THRESHOLD * 255, levels.astype(np.float32) / np.float32(255))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL gives a photo's size."""
        return self.mask.shape[1], self.mask.shape[0]

    @property
    def area_px(self) -> int:
        """Fish pixels."""
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

    def overlay(self, image: ImageInput) -> Image.Image:
        """A copy of ``image`` (the photo this was made from, as Segmenter takes it) with the fish tinted, as
        predict's overlays/NAME.png."""
        photo = _photo(image)
        if photo.size != self.size:
            raise FishsegError(f"overlay: the image is {photo.width}×{photo.height} but the mask "
                               f"{self.size[0]}×{self.size[1]}; pass the image this segmentation was made from")
        return tint(photo.copy(), self.mask)


@dataclasses.dataclass(frozen=True, eq=False)
class Segmenter:
    """A trained decoder on its frozen backbone, loaded once: photos in, masks out.

        segmenter = fishseg.Segmenter.from_run("runs/progressive")  # backbone=, device=, precision=, batch_size=
        result = segmenter("photo.jpg")
        result.mask           # H×W bool at the photo's own size: fish where the probability exceeds 0.5
        result.probabilities  # H×W float32 in [0, 1]

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
                   meta.layers, precision, batch_size)

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
        return [Segmentation.upsampled(probability, photo.size)
                for probability, photo in zip(self.probability_maps(images, previews), photos)]

    def probability_maps(self, images: torch.Tensor, previews: torch.Tensor) -> torch.Tensor:
        """B×S×S float32 fish probabilities at the run's image size, of uint8 images B×3×S×S and their previews
        B×P×P×3 (as data.images.prediction_inputs makes them): the forward pass every prediction goes through."""
        guides = previews.to(self.device) if uses_image(self.decoder) else None
        with precision_scope(self.precision), torch.inference_mode(), autocast(self.device, "decoder"):
            return self.forward(images, guides)

    def forward(self, images: torch.Tensor, guides: torch.Tensor | None) -> torch.Tensor:
        """B×S×S float32 fish probabilities of uint8 images B×3×S×S, a decoder that uses the image reading its
        guides B×P×P×3 (None for the others): backbone, decoder, sigmoid, under the caller's precision and grad
        mode (``probability_maps`` for predictions, the exporter's trace for the ONNX graph)."""
        features = self.backbone(images, self.layers)
        return torch.sigmoid(segment(self.decoder, features, self.image_size, guides).float())


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
