"""Datasets on disk: the two layouts, pairing images with masks, and image decoding.

Layouts accepted as a data root:

* Kaggle "A Large-Scale Fish Dataset": the download folder, ``Fish_Dataset/`` or
  ``Fish_Dataset/Fish_Dataset/``. Each species folder ``<Class>/`` holds ``<Class>/`` (images) and
  ``<Class> GT/`` (masks with the same file names). ``NA_Fish_Dataset`` and stray files are ignored.
* Generic: ``images/`` and ``masks/`` with matching file stems. When ``images/`` holds no image
  files directly, each of its sub-folders is a class, matched by name under ``masks/``.

Images and masks are paired by file stem, never by sorted position. Mask rule: a pixel is
foreground when its value is non-zero after conversion to 8-bit grayscale (PIL mode ``L``), so
1-bit, 0/1, 0/255, RGB and RGBA masks all work; masks are resized with nearest neighbour. Masks of several
pixel classes (``extract --classes``) are read by ``fishseg.data.labels``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from fishseg.config import IDENTITY
from fishseg.errors import FishsegError
from fishseg.runtime import plural

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
KAGGLE_MASK_SUFFIX = " GT"
GENERIC_CLASS = "fish"  # class name for a generic layout without class sub-folders
MAX_LISTED = 10  # file names shown in an error before "and N more"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image with its mask; ``image_id`` is the image path relative to the data root."""

    image_id: str
    image_path: Path
    mask_path: Path
    class_name: str
    source_stat: tuple[int, int, int, int] = (0, 0, 0, 0)  # image bytes, image mtime ns, mask bytes, mask mtime ns


def source_stat(image_path: Path, mask_path: Path) -> tuple[int, int, int, int]:
    """What tells a changed file from an unchanged one without reading it (as make and rsync do)."""
    image, mask = image_path.stat(), mask_path.stat()
    return image.st_size, image.st_mtime_ns, mask.st_size, mask.st_mtime_ns


def discover_samples(root: Path) -> list[Sample]:
    """Find every image/mask pair under ``root``, sorted by image id."""
    if not root.is_dir():
        raise FishsegError(f"{root}: data root not found or not a folder")
    kaggle_root = _find_kaggle_root(root)
    if kaggle_root is not None:
        samples = _kaggle_samples(kaggle_root, root)
    elif (root / "images").is_dir():
        samples = _generic_samples(root)
    else:
        raise FishsegError(
            f"{root}: no dataset found; expected the Kaggle layout (<Class>/<Class>/ with "
            f"<Class>/<Class> GT/) or images/ and masks/ folders"
        )
    if not samples:
        raise FishsegError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(samples, key=lambda sample: sample.image_id)


def _species_dirs(folder: Path) -> list[Path]:
    """Kaggle species folders: ``<Class>/`` that contains an image folder ``<Class>/``."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and (d / d.name).is_dir())


def _find_kaggle_root(root: Path) -> Path | None:
    # Deepest first: the outer Fish_Dataset/ holds Fish_Dataset/Fish_Dataset/, which looks like a species.
    for candidate in (root / "Fish_Dataset" / "Fish_Dataset", root / "Fish_Dataset", root):
        if candidate.is_dir() and _species_dirs(candidate):
            return candidate
    return None


def _kaggle_samples(kaggle_root: Path, data_root: Path) -> list[Sample]:
    samples = []
    for species in _species_dirs(kaggle_root):
        mask_dir = species / f"{species.name}{KAGGLE_MASK_SUFFIX}"
        samples += _pair_folder(species / species.name, mask_dir, species.name, data_root)
    return samples


def _generic_samples(root: Path) -> list[Sample]:
    image_dir, mask_dir = root / "images", root / "masks"
    if _image_files(image_dir):
        return _pair_folder(image_dir, mask_dir, GENERIC_CLASS, root)
    samples = []
    for class_dir in sorted(d for d in image_dir.iterdir() if d.is_dir()):
        samples += _pair_folder(class_dir, mask_dir / class_dir.name, class_dir.name, root)
    return samples


def in_class_folders(samples: list[Sample]) -> bool:
    """Whether every image lies in a folder named after its class: the Kaggle layout's species folders or the
    generic layout's ``images/<class>/``, not the generic layout's images directly in ``images/`` (one class)."""
    return all(sample.image_path.parent.name == sample.class_name for sample in samples)


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` keyed by stem; two files with one stem are an error."""
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            continue
        if path.stem in by_stem:
            raise FishsegError(f"{path}: same name as {by_stem[path.stem].name}; keep one image per name")
        by_stem[path.stem] = path
    return by_stem


def _pair_folder(image_dir: Path, mask_dir: Path, class_name: str, data_root: Path) -> list[Sample]:
    images = _image_files(image_dir)
    if not images:
        return []
    if not mask_dir.is_dir():
        raise FishsegError(f"{mask_dir}: mask folder missing for the {plural(len(images), 'image')} in {image_dir}")
    masks = _image_files(mask_dir)
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired:
        listed = [str(images.get(stem) or masks[stem]) for stem in unpaired]
        more = f" and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
        raise FishsegError(
            f"{image_dir}: {plural(len(listed), 'file')} without a partner in {mask_dir.name}/ or "
            f"{image_dir.name}/: {', '.join(listed[:MAX_LISTED])}{more}"
        )
    return [
        Sample(path.relative_to(data_root).as_posix(), path, masks[stem], class_name, source_stat(path, masks[stem]))
        for stem, path in images.items()
    ]


def open_image(path: Path) -> Image.Image:
    """Decode an image upright: a phone photo's EXIF orientation tag is applied, as viewers do."""
    try:
        with Image.open(path) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise FishsegError(f"{path}: cannot read image ({error})") from None


def read_rgb(path: Path) -> Image.Image:
    """Decode any image mode to 8-bit RGB; 16-bit and 32-bit grayscale are scaled to 0..255."""
    return as_rgb(open_image(path))


def as_rgb(image: Image.Image) -> Image.Image:
    """Any image mode as 8-bit RGB, as ``read_rgb`` decodes files: 16-bit and 32-bit grayscale scaled to 0..255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max() > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_mask(path: Path) -> Image.Image:
    """Decode a mask to mode ``L`` with values 0 (background) and 1 (foreground: non-zero in L)."""
    foreground = np.asarray(open_image(path).convert("L")) > 0
    return Image.fromarray(foreground.astype(np.uint8), mode="L")


def binary_labels(sample: Sample) -> Image.Image:
    """A sample's mask read as binary (``read_mask``): how extraction reads masks without a class list."""
    return read_mask(sample.mask_path)


def prediction_inputs(image: Image.Image, image_size: int, preview_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a trained decoder is given for an RGB photo: the backbone's input (uint8 3×S×S) and the preview
    (uint8 P×P×3) made as extraction makes the cache's, the guide of a decoder that uses the image."""
    return model_input(image, image_size), resized_rgb(image, preview_size)


def model_input(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as the backbone takes it: bilinear resize to size×size, uint8 3×S×S."""
    return resized_rgb(image, size).permute(2, 0, 1)


def resized_rgb(image: Image.Image, size: int) -> torch.Tensor:
    """Bilinear resize to uint8 size×size×3: how the cache's previews (a guided decoder's guides) are made."""
    return torch.from_numpy(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)).copy())


def apply_view(tensor: torch.Tensor, view: str, dims: tuple[int, int]) -> torch.Tensor:
    """``tensor`` seen in ``view`` (config.IDENTITY or one of config.VIEWS), ``dims`` its (row, column) axes:
    images B×3×S×S use (2, 3), grids B×h×w×D and masks B×S×S (1, 2). Rotations are counter-clockwise."""
    rows, cols = dims
    transforms = {
        IDENTITY: lambda x: x, "hflip": lambda x: x.flip(cols), "vflip": lambda x: x.flip(rows),
        "rot90": lambda x: x.rot90(1, dims), "rot180": lambda x: x.rot90(2, dims), "rot270": lambda x: x.rot90(3, dims),
        "transpose": lambda x: x.transpose(rows, cols),
    }
    return transforms[view](tensor).contiguous()


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly, and every image file under named folders (recursively), in order."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FishsegError(f"{path}: no such file or folder")
    if not found:
        raise FishsegError(f"no images in {', '.join(map(str, inputs))} "
                           f"(extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


class ImageDataset(torch.utils.data.Dataset):
    """Images without masks, for prediction: ``(image 3×S×S uint8, preview P×P×3 uint8, error)`` (the preview
    made as extraction makes the cache's, for a decoder that uses the image), zeros and a one-line error for
    an image that cannot be read."""

    def __init__(self, paths: list[Path], image_size: int, preview_size: int) -> None:
        self.paths, self.image_size, self.preview_size = paths, image_size, preview_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        try:
            image = read_rgb(self.paths[index])
        except FishsegError as error:
            return (torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8),
                    torch.zeros(self.preview_size, self.preview_size, 3, dtype=torch.uint8), str(error))
        return (*prediction_inputs(image, self.image_size, self.preview_size), "")


class ExtractionDataset(torch.utils.data.Dataset):
    """Decodes and resizes one sample per item (runs in DataLoader workers).

    Returns ``(image 3×S×S uint8, mask S×S uint8 class indices, preview P×P×3 uint8, error)``; ``read_labels``
    reads a sample's mask as class indices in mode ``L`` (binary: {0, 1}; ``fishseg.data.labels.mask_reader``
    for the other mask formats), resized with nearest neighbour. Normalisation happens on the device, so workers
    ship 4× fewer bytes than float images. A sample that cannot be read comes back as zeros with a one-line
    ``error`` (empty when fine): an exception raised in a worker would reach the user wrapped in a traceback.
    """

    def __init__(self, samples: list[Sample], image_size: int, preview_size: int,
                 read_labels: Callable[[Sample], Image.Image] = binary_labels) -> None:
        self.samples = samples
        self.image_size = image_size
        self.preview_size = preview_size
        self.read_labels = read_labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        side, preview = (self.image_size,) * 2, (self.preview_size,) * 2
        try:
            image, mask = self._read(self.samples[index])
        except FishsegError as error:
            return (torch.zeros(3, *side, dtype=torch.uint8), torch.zeros(side, dtype=torch.uint8),
                    torch.zeros(*preview, 3, dtype=torch.uint8), str(error))
        return (
            model_input(image, self.image_size),
            torch.from_numpy(np.asarray(mask.resize(side, Image.Resampling.NEAREST)).copy()),
            resized_rgb(image, self.preview_size),
            "",
        )

    def _read(self, sample: Sample) -> tuple[Image.Image, Image.Image]:
        image, mask = read_rgb(sample.image_path), self.read_labels(sample)
        if image.size != mask.size:
            raise FishsegError(
                f"{sample.mask_path}: mask is {mask.size[0]}×{mask.size[1]} but its image is "
                f"{image.size[0]}×{image.size[1]}; masks must match their images"
            )
        return image, mask
