"""Class lists and masks read as class indices (fishseg.data.labels), and extraction with `--classes`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fishseg
from fishseg.cli import main
from fishseg.config import ExtractConfig
from fishseg.data.images import Sample, discover_samples, read_mask
from fishseg.data.labels import mask_reader, read_class_list, species_classes
from fishseg.data.synthetic import write_multispecies_dataset
from fishseg.formats.cache import FeatureCache
from tests.helpers import SMALL_PHOTO, TINY_IMAGE_SIZE

NAMES = ("background", "cod", "reef")
COLOURS = ((0, 0, 0), (255, 255, 0), (255, 0, 255))
LABELS = np.array([[0, 1, 1, 2], [0, 0, 2, 2], [1, 1, 0, 0]], np.uint8)  # H×W class indices
INDEX = ExtractConfig(mask_format="index", classes=NAMES)
RGB = ExtractConfig(mask_format="rgb", classes=NAMES, colours=COLOURS)


def _read(config: ExtractConfig, mask: Image.Image, tmp_path: Path, class_name: str = "fish") -> np.ndarray:
    mask.save(tmp_path / "mask.png")
    return np.asarray(mask_reader(config)(Sample("x.png", tmp_path / "x.png", tmp_path / "mask.png", class_name)))


def _palette(labels: np.ndarray) -> Image.Image:
    image = Image.fromarray(labels, mode="P")
    image.putpalette([value for colour in COLOURS for value in colour])
    return image


def _colour_coded(labels: np.ndarray) -> np.ndarray:
    return np.asarray(COLOURS, np.uint8)[labels]


@pytest.mark.parametrize("make", [lambda labels: Image.fromarray(labels, mode="L"), _palette],
                         ids=["grayscale", "palette"])
def test_index_masks_read_each_value_as_its_class(make: Callable[[np.ndarray], Image.Image], tmp_path: Path) -> None:
    assert np.array_equal(_read(INDEX, make(LABELS), tmp_path), LABELS)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_rgb_masks_read_each_colour_as_its_class(mode: str, tmp_path: Path) -> None:
    mask = Image.fromarray(_colour_coded(LABELS)).convert(mode)
    assert np.array_equal(_read(RGB, mask, tmp_path), LABELS)


def test_index_masks_read_with_colours_say_to_list_names_only(tmp_path: Path) -> None:
    with pytest.raises(fishseg.FishsegError, match=r"mask\.png: colour \(1, 1, 1\).*single-channel mask, read as "
                                                   r"grey: for masks of class indices, list the classes' names"):
        _read(RGB, Image.fromarray(LABELS, mode="L"), tmp_path)


def test_species_masks_give_the_fish_their_folder_class(kaggle_root: Path, tmp_path: Path) -> None:
    samples = discover_samples(kaggle_root)
    classes = species_classes(samples, kaggle_root)
    assert classes == ("background", *sorted({sample.class_name for sample in samples}))
    config = ExtractConfig(mask_format="species", classes=classes)
    for sample in (samples[0], samples[-1]):
        labels = np.asarray(mask_reader(config)(sample))
        fish = np.asarray(read_mask(sample.mask_path)).astype(bool)
        assert np.array_equal(labels, fish * classes.index(sample.class_name))


@pytest.mark.parametrize("mask", [
    np.array([[0, 255], [128, 0]], np.uint8), np.array([[0, 1], [1, 0]], np.uint8),
    np.array([[[0, 0, 0], [9, 0, 0]], [[0, 0, 0], [0, 0, 0]]], np.uint8), np.array([[0, 40000]], np.uint16),
], ids=["0-255", "0-1", "RGB", "16-bit"])
def test_binary_masks_read_as_before(mask: np.ndarray, tmp_path: Path) -> None:
    labels = _read(ExtractConfig(), Image.fromarray(mask), tmp_path)
    assert labels.tobytes() == np.asarray(read_mask(tmp_path / "mask.png")).tobytes()


def test_a_class_list_gives_names_and_for_colour_entries_colours(tmp_path: Path) -> None:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(NAMES))
    assert read_class_list(path) == (NAMES, ())
    path.write_text(json.dumps([{"name": name, "rgb": list(colour)} for name, colour in zip(NAMES, COLOURS)]))
    assert read_class_list(path) == (NAMES, COLOURS)


def _extract(root: Path, backbone: Path, *extra: str) -> list[str]:
    return ["extract", "--data-root", str(root), "--out", str(root.parent / "out.h5"), "--backbone", str(backbone),
            "--image-size", str(TINY_IMAGE_SIZE), "--preview-size", "32", "--num-workers", "0", "--device", "cpu",
            *extra]


def _dataset(root: Path, masks: list[np.ndarray], classes: object = NAMES) -> Path:
    """A generic-layout dataset of one photo per mask, and its class list ``root/classes.json``."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k, mask in enumerate(masks):
        Image.fromarray(np.full((*mask.shape[:2], 3), 90 + 40 * k, np.uint8)).save(root / "images" / f"{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
    (root / "classes.json").write_text(classes if isinstance(classes, str) else json.dumps(classes))
    return root


def _labels(value: int | None = None) -> np.ndarray:
    """A 30×40 mask of ``LABELS`` blown up (or of one ``value`` everywhere)."""
    labels = np.kron(LABELS, np.ones((10, 10), np.uint8))[:, :40] if value is None else np.full((30, 40), value)
    return labels.astype(np.uint8)


def _with(labels: np.ndarray, row: int, value: int) -> np.ndarray:
    labels = labels.copy()
    labels[row] = value
    return labels


CASES = [  # name, masks, class list, what --classes gets, the error line (a regex)
    ("value not in the list", [_labels(), _with(_labels(), 3, 7)], NAMES, "classes.json",
     r"masks/1\.png: mask value 7 is not in the class list, whose 3 classes are values 0 … 2"),
    ("colour not in the list", [_colour_coded(_labels()), _with(_colour_coded(_labels()), 2, 9)],
     [{"name": name, "rgb": list(colour)} for name, colour in zip(NAMES, COLOURS)], "classes.json",
     r"masks/1\.png: colour \(9, 9, 9\) \(at x 0, y 2; 40 pixels\) is not in the class list"),
    ("list not JSON", [_labels()], "[background, cod]", "classes.json", r"classes\.json: not a JSON class list"),
    ("not a list", [_labels()], {"0": "background"}, "classes.json",
     r"classes\.json: a class list is a JSON list .*, not an object"),
    ("mixed entries", [_labels()], ["background", {"name": "cod", "rgb": [1, 2, 3]}], "classes.json",
     r"classes\.json: every entry must be a class name, or every entry"),
    ("duplicate names", [_labels()], ["background", "cod", "cod"], "classes.json",
     r"classes\.json: classes 'background','cod','cod': expected each value once"),
    ("all background", [_labels(0), _labels(0)], NAMES, "classes.json",
     r"input: every pixel of every mask is class 0 \('background'\) of the 3 classes"),
    ("one class everywhere", [_labels(2), _labels(2)], NAMES, "classes.json",
     r"input: every pixel of every mask is class 2 \('reef'\)"),
    ("species without class folders", [_labels()], NAMES, "species",
     r"input: --classes species gives each image's fish the class of its species folder, but these images are "
     r"in no class folders"),
]


@pytest.mark.parametrize("case, masks, classes, option, message", CASES, ids=[case[0] for case in CASES])
def test_bad_class_data_gives_one_line_exit_2_and_no_output(case: str, masks: list[np.ndarray], classes: object,
                                                             option: str, message: str, tmp_path: Path,
                                                             tiny_backbone: Path) -> None:
    root = _dataset(tmp_path / "input", masks, classes)
    given = str(root / option) if option.endswith(".json") else option
    result = CliRunner().invoke(main, _extract(root, tiny_backbone, "--classes", given))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]) and "Traceback" not in result.output
    assert re.search(message, errors[0]), errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"], "output left behind"


def test_multispecies_photos_extract_into_a_cache_of_their_classes(tmp_path: Path, tiny_backbone: Path) -> None:
    root = write_multispecies_dataset(tmp_path / "input", images=4, size=SMALL_PHOTO)
    names = tuple(json.loads((root / "classes.json").read_text()))
    result = CliRunner().invoke(main, _extract(root, tiny_backbone, "--classes", str(root / "classes.json"),
                                               "--views", "hflip"))
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / "out.h5") as cache:
        masks = cache.masks(range(len(cache)))
        assert cache.classes.names == names and not cache.classes.binary
        assert cache.class_pixels.tolist() == np.bincount(masks.ravel(), minlength=len(names)).tolist()
        assert all(set(np.unique(mask)) - {0} for mask in masks), "every photo holds fish"
        assert len({int(k) for mask in masks for k in np.unique(mask)}) == len(names)
        assert np.array_equal(cache.masks(range(len(cache)), "hflip"), masks[..., ::-1]), "labels survive a view"
    shares = ", ".join(f"{name} {count / masks.size:.1%}" for name, count in zip(names, np.bincount(masks.ravel())))
    assert f"pixel classes: {shares}" in result.output.splitlines()


def test_from_python_the_class_list_itself_is_taken(tmp_path: Path, tiny_backbone: Path) -> None:
    root = write_multispecies_dataset(tmp_path / "input", images=3, size=SMALL_PHOTO)
    names = json.loads((root / "classes.json").read_text())
    options = dict(backbone=str(tiny_backbone), image_size=TINY_IMAGE_SIZE, num_workers=0, device="cpu")
    from_list = fishseg.extract(root, tmp_path / "list.h5", classes=names, **options)
    from_file = fishseg.extract(root, tmp_path / "file.h5", classes=root / "classes.json", **options)
    assert from_list.classes == from_file.classes and from_list.classes.names == tuple(names)
    with FeatureCache(tmp_path / "list.h5") as listed, FeatureCache(tmp_path / "file.h5") as filed:
        assert listed.fingerprint == filed.fingerprint
    with pytest.raises(fishseg.FishsegError, match=r"^`classes`: classes 'background','cod','cod': expected each "
                                                   r"value once \('cod' more than once\)$"):
        fishseg.extract(root, tmp_path / "bad.h5", classes=["background", "cod", "cod"], **options)
    assert not (tmp_path / "bad.h5").exists()


def test_multispecies_dataset_is_the_same_for_a_seed(tmp_path: Path) -> None:
    first, again, other = (write_multispecies_dataset(tmp_path / name, images=2, size=SMALL_PHOTO, seed=seed)
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(path.relative_to(first) for path in first.rglob("*.png"))
    assert files and all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_species_classes_extract_from_the_kaggle_layout(kaggle_root: Path, tiny_backbone: Path,
                                                        tmp_path: Path) -> None:
    result = fishseg.extract(kaggle_root, tmp_path / "species.h5", backbone=str(tiny_backbone),
                             image_size=TINY_IMAGE_SIZE, preview_size=32, num_workers=0, device="cpu",
                             classes="species")
    with FeatureCache(result.cache) as cache:
        assert result.classes.names == ("background", *cache.class_names)
        masks = cache.masks(range(len(cache)))
        for mask, species in zip(masks, cache.class_index):
            assert set(np.unique(mask)) == {0, species + 1}
    assert list(result.class_pixels.values()) == np.bincount(masks.ravel()).tolist()
    assert list(result.class_pixels) == list(result.classes.names)


def test_binary_extraction_prints_and_returns_as_before(tmp_path: Path, tiny_backbone: Path) -> None:
    root = _dataset(tmp_path / "input", [_labels() * 255, _labels()])
    result = CliRunner().invoke(main, _extract(root, tiny_backbone))
    assert result.exit_code == 0, result.output
    assert "pixel classes" not in result.output
    extracted = fishseg.extract(root, tmp_path / "out.h5", backbone=str(tiny_backbone), image_size=TINY_IMAGE_SIZE,
                                preview_size=32, num_workers=0, device="cpu")
    assert extracted.classes.binary and list(extracted.class_pixels) == ["background", "fish"]
    with FeatureCache(extracted.cache) as cache:
        assert set(np.unique(cache.masks(range(len(cache))))) == {0, 1}
