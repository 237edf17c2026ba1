"""Pixel classes on disk: class lists (``extract --classes FILE``) and masks read as class indices.

A class list is a JSON list whose entry k names class k, entry 0 the background: names only, for masks whose pixel
values are class indices (8-bit single-channel or palette PNGs), or ``{"name": ..., "rgb": [r, g, b]}`` entries,
for colour-coded RGB masks (SUIM's convention). ``classes="species"`` takes the classes from the layout's species
(class) folders instead: binary masks whose fish pixels take their image's class. Without a class list, masks are
binary as fishseg always read them (``fishseg.data.images.read_mask``). The formats are config.MASK_FORMATS.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
from PIL import Image

from fishseg.classes import BACKGROUND, Classes, Colour
from fishseg.config import ExtractConfig, shown
from fishseg.data.images import Sample, binary_labels, discover_samples, in_class_folders, open_image, read_mask
from fishseg.errors import FishsegError
from fishseg.runtime import plural

__all__ = ["SPECIES", "check_classes_present", "check_layout_classes", "class_fields", "mask_reader",
           "read_class_list", "species_classes"]

SPECIES = "species"  # `extract --classes species`: the classes are the layout's species folders
INDEX_MODES = frozenset({"1", "L", "P", "I", "I;16", "I;16L", "I;16B"})  # one channel: a pixel's value is its class
LIST_EXAMPLE = '["background", "fish", "reef"] or [{"name": "background", "rgb": [0, 0, 0]}, ...]'


def class_fields(classes: Union[str, os.PathLike, list, tuple], data_root: Path) -> dict[str, Any]:
    """ExtractConfig's ``mask_format``, ``classes`` and ``colours`` for ``extract(classes=...)``: the string
    "species" (the classes of ``data_root``'s class folders), the path of a class list, or the list itself (from
    Python: names, or ``{"name", "rgb"}`` entries)."""
    if isinstance(classes, str) and classes == SPECIES:
        return {"mask_format": SPECIES, "classes": species_classes(discover_samples(data_root), data_root)}
    names, colours = (class_entries(list(classes), "`classes`") if isinstance(classes, (list, tuple))
                      else read_class_list(Path(classes)))
    return {"mask_format": "rgb" if colours else "index", "classes": names, "colours": colours}


def read_class_list(path: Path) -> tuple[tuple[str, ...], tuple[Colour, ...]]:
    """The class names of a class list and, when its entries give colours, each class's colour in the masks (()
    for a list of names). Anything else is refused with one line naming ``path``."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FishsegError(f"{path}: cannot read the class list ({error.strerror or error})") from None
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FishsegError(f"{path}: not a JSON class list ({error}); expected e.g. {LIST_EXAMPLE}") from None
    if not isinstance(entries, list):
        raise FishsegError(f"{path}: a class list is a JSON list (entry k names class k, 0 the background), not "
                           f"{_json_kind(entries)}; e.g. {LIST_EXAMPLE}")
    return class_entries(entries, str(path))


def class_entries(entries: list, source: str) -> tuple[tuple[str, ...], tuple[Colour, ...]]:
    """The names and colours (() for names alone) of a class list's entries, checked; a refusal starts with
    ``source`` (the file, or the keyword that gave the list)."""
    if all(isinstance(entry, str) for entry in entries):
        names, colours = tuple(entries), ()
    elif all(_colour_entry(entry) for entry in entries):
        names, colours = tuple(entry["name"] for entry in entries), tuple(tuple(entry["rgb"]) for entry in entries)
    else:
        raise FishsegError(f'{source}: every entry must be a class name, or every entry {{"name": ..., "rgb": [r, '
                           f'g, b]}} (colour-coded masks), not a mix or other values; e.g. {LIST_EXAMPLE}')
    try:
        ExtractConfig(mask_format="rgb" if colours else "index", classes=names, colours=colours)
    except FishsegError as error:
        raise FishsegError(f"{source}: {error}") from None
    return names, colours


def _colour_entry(entry: Any) -> bool:
    """``{"name": str, "rgb": [r, g, b]}``: what the values hold is checked with the rest of the classes."""
    return (isinstance(entry, dict) and set(entry) == {"name", "rgb"} and isinstance(entry["name"], str)
            and isinstance(entry["rgb"], (list, tuple)))


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def species_classes(samples: list[Sample], data_root: Path) -> tuple[str, ...]:
    """The classes of ``classes="species"``: the background, then the layout's class folders in the cache's order
    (sorted, as its ``class_names``). Only a layout of class folders has them."""
    if not in_class_folders(samples):
        raise FishsegError(f"{data_root}: `classes='species'` gives each image's fish the class of its species "
                           f"folder, but these images are in no class folders (Kaggle layout, or images/<class>/ "
                           f"with masks/<class>/); give a class list instead")
    folders = sorted({sample.class_name for sample in samples})
    if BACKGROUND in folders:
        raise FishsegError(f"{data_root}: a class folder is named '{BACKGROUND}', the name of class 0 with "
                           f"`classes='species'`; rename the folder")
    return (BACKGROUND, *folders)


def check_layout_classes(config: ExtractConfig, samples: list[Sample], data_root: Path) -> None:
    """A species config must name exactly the classes of ``data_root``'s class folders (a config given whole may
    not)."""
    if config.mask_format == SPECIES and config.classes != species_classes(samples, data_root):
        raise FishsegError(f"{data_root}: its class folders give classes {shown(species_classes(samples, data_root))}"
                           f" but `classes` names {shown(config.classes)}")


def mask_reader(config: ExtractConfig) -> Callable[[Sample], Image.Image]:
    """How extraction reads a sample's mask under ``config.mask_format``: class indices, mode ``L``, at the mask's
    own size. A value or colour outside the class list is refused with one line naming the file."""
    readers = {
        "binary": binary_labels,
        "index": functools.partial(_index_labels, count=len(config.classes)),
        "rgb": functools.partial(_rgb_labels, colours=config.colours),
        SPECIES: functools.partial(_species_labels, classes=config.classes),
    }
    return readers[config.mask_format]


def _index_labels(sample: Sample, count: int) -> Image.Image:
    """A single-channel or palette mask: a pixel's value (palette index) is its class, below ``count``."""
    mask = open_image(sample.mask_path)
    if mask.mode not in INDEX_MODES:
        raise FishsegError(f"{sample.mask_path}: a {mask.mode} mask, but a class list of names reads each pixel's "
                           f"value as its class (8-bit grayscale or palette PNG); for colour-coded masks give each "
                           f'class its colour ({{"name": ..., "rgb": [r, g, b]}})')
    values = np.asarray(mask).astype(np.int64)
    outside = np.unique(values[(values < 0) | (values >= count)])
    if outside.size:
        others = f" (and {plural(outside.size - 1, 'other value')})" if outside.size > 1 else ""
        raise FishsegError(f"{sample.mask_path}: mask value {outside[0]}{others} is not in the class list, whose "
                           f"{count} classes are values 0 … {count - 1}")
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _rgb_labels(sample: Sample, colours: tuple[Colour, ...]) -> Image.Image:
    """A colour-coded mask: a pixel's colour is its class's entry in ``colours``."""
    mask = open_image(sample.mask_path)
    rgb = np.asarray(mask.convert("RGB")).astype(np.int64)
    codes = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    keys = np.array([r << 16 | g << 8 | b for r, g, b in colours])
    order = np.argsort(keys)
    position = np.searchsorted(keys[order], codes).clip(max=len(keys) - 1)
    known = keys[order][position] == codes
    if not known.all():
        row, col = np.argwhere(~known)[0]
        red, green, blue = rgb[row, col]
        raise FishsegError(f"{sample.mask_path}: colour ({red}, {green}, {blue}) (at x {col}, y {row}; "
                           f"{plural(int((codes == codes[row, col]).sum()), 'pixel')}) is not in the class list "
                           + ("(a single-channel mask, read as grey: for masks of class indices, list the classes' "
                              "names without colours)" if mask.mode in ("1", "L", "I", "I;16") else
                              "(colour-coded masks must be saved losslessly, e.g. as PNG)"))
    return Image.fromarray(order[position].astype(np.uint8), mode="L")


def _species_labels(sample: Sample, classes: tuple[str, ...]) -> Image.Image:
    """A binary mask whose fish pixels take the class of the image's species folder."""
    fish = np.asarray(read_mask(sample.mask_path))
    return Image.fromarray(fish * np.uint8(classes.index(sample.class_name)), mode="L")


def check_classes_present(class_pixels: np.ndarray, classes: Classes, data_root: Path) -> None:
    """Refuse masks that hold one class in every pixel of every image (``class_pixels``: C counts): there is
    nothing to tell apart."""
    present = np.flatnonzero(class_pixels)
    if len(present) == 1:
        raise FishsegError(f"{data_root}: every pixel of every mask is class {present[0]} "
                           f"('{classes.names[present[0]]}') of the {len(classes)} classes "
                           f"{', '.join(classes.names)}; there is nothing to tell apart: check the masks and the "
                           f"class list")
