from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fishseg.data.images import ExtractionDataset, discover_samples, read_mask, read_rgb
from fishseg.data.splits import random_split
from fishseg.errors import FishsegError


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _pair(root: Path, image_rel: str, mask_rel: str, size: tuple[int, int] = (20, 16)) -> None:
    _save(root / image_rel, np.full((size[1], size[0], 3), 128, np.uint8))
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[4:10, 5:12] = 255
    _save(root / mask_rel, mask)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_kaggle_layout_is_found_from_each_accepted_root(kaggle_root: Path, depth: int) -> None:
    root = kaggle_root / "/".join(["Fish_Dataset"] * depth) if depth else kaggle_root
    samples = discover_samples(root)
    assert len(samples) == 12
    assert {s.class_name for s in samples} == {"Black Sea Sprat", "Hourse Mackerel"}
    for sample in samples:
        assert (root / sample.image_id) == sample.image_path
        assert sample.mask_path.parent.name == f"{sample.class_name} GT"
        assert sample.mask_path.name == sample.image_path.name


def test_kaggle_layout_ignores_na_dataset_and_stray_files(tmp_path: Path) -> None:
    dataset = tmp_path / "Fish_Dataset" / "Fish_Dataset"
    _pair(dataset, "Red Mullet/Red Mullet/00001.png", "Red Mullet/Red Mullet GT/00001.png")
    _pair(dataset, "Red Mullet/Red Mullet/00003.png", "Red Mullet/Red Mullet GT/00003.png")
    (dataset / "README.txt").write_text("readme")
    (dataset / "Segmentation_example_script.m").write_text("% matlab")
    _save(tmp_path / "NA_Fish_Dataset" / "Red Mullet" / "00001.jpg", np.zeros((8, 8, 3), np.uint8))
    samples = discover_samples(tmp_path)
    assert [s.image_id for s in samples] == ["Fish_Dataset/Fish_Dataset/Red Mullet/Red Mullet/00001.png",
                                             "Fish_Dataset/Fish_Dataset/Red Mullet/Red Mullet/00003.png"]


def test_generic_flat_layout_pairs_by_stem_across_extensions(tmp_path: Path) -> None:
    _pair(tmp_path, "images/b.jpg", "masks/b.png")
    _pair(tmp_path, "images/a.png", "masks/a.bmp")
    samples = discover_samples(tmp_path)
    assert [(s.image_id, s.mask_path.name, s.class_name) for s in samples] == [
        ("images/a.png", "a.bmp", "fish"), ("images/b.jpg", "b.png", "fish")]


def test_generic_layout_with_class_folders(tmp_path: Path) -> None:
    _pair(tmp_path, "images/cod/1.png", "masks/cod/1.png")
    _pair(tmp_path, "images/eel/1.png", "masks/eel/1.png")
    samples = discover_samples(tmp_path)
    assert [(s.image_id, s.class_name) for s in samples] == [("images/cod/1.png", "cod"), ("images/eel/1.png", "eel")]
    assert samples[1].mask_path == tmp_path / "masks/eel/1.png"


def test_pairing_is_by_name_not_position(tmp_path: Path) -> None:
    """A gap in the numbering on both sides must not shift later pairs (the reference's bug)."""
    for number in (1, 3, 4):
        _pair(tmp_path, f"images/{number:05d}.png", f"masks/{number:05d}.png")
    assert all(s.image_path.stem == s.mask_path.stem for s in discover_samples(tmp_path))


def test_unpaired_files_are_an_error_listing_them(tmp_path: Path) -> None:
    _pair(tmp_path, "images/1.png", "masks/1.png")
    _save(tmp_path / "images/2.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "masks/9.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FishsegError, match=r"2 files without a partner.*images/2\.png.*masks/9\.png"):
        discover_samples(tmp_path)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "no dataset found"),
    (lambda root: (root / "images").mkdir(), "no images found"),
    (lambda root: _save(root / "images/1.png", np.zeros((4, 4, 3), np.uint8)), "mask folder missing"),
    (lambda root: _save(root / "Cod/Cod/1.png", np.zeros((4, 4, 3), np.uint8)), r"Cod GT: mask folder missing"),
])
def test_layout_errors(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(FishsegError, match=message):
        discover_samples(tmp_path)


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FishsegError, match="data root not found"):
        discover_samples(tmp_path / "nope")


BLOB = np.zeros((6, 6), bool)
BLOB[1:4, 2:5] = True


@pytest.mark.parametrize("encode", [
    lambda m: Image.fromarray(m).convert("1"),  # 1-bit
    lambda m: Image.fromarray(m.astype(np.uint8), mode="L"),  # 0/1
    lambda m: Image.fromarray(m.astype(np.uint8) * 255, mode="L"),  # 0/255
    lambda m: Image.fromarray(np.stack([m.astype(np.uint8) * 255] * 3, -1), mode="RGB"),
    lambda m: Image.fromarray(np.dstack([m.astype(np.uint8) * 200] * 3 + [np.full(m.shape, 255, np.uint8)]), mode="RGBA"),
], ids=["1-bit", "L-0-1", "L-0-255", "RGB", "RGBA"])
def test_mask_foreground_is_nonzero_after_conversion_to_L(tmp_path: Path, encode) -> None:
    path = tmp_path / "mask.png"
    encode(BLOB).save(path)
    mask = np.asarray(read_mask(path))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask.astype(bool), BLOB)


@pytest.mark.parametrize("array, expected_grey", [
    (np.full((4, 4), 65535, np.uint16), 255),  # 16-bit grayscale
    (np.full((4, 4), 77, np.uint8), 77),  # 8-bit grayscale
    (np.full((4, 4, 4), 90, np.uint8), 90),  # RGBA
], ids=["16-bit", "L", "RGBA"])
def test_images_of_any_mode_become_rgb(tmp_path: Path, array: np.ndarray, expected_grey: int) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    image = read_rgb(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [expected_grey] * 3


def test_palette_image_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.fromarray(np.full((4, 4, 3), (200, 10, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert np.asarray(read_rgb(path))[0, 0].tolist() == [200, 10, 30]


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(FishsegError, match="broken.png: cannot read image"):
        read_rgb(path)


def test_extraction_dataset_resizes_and_keeps_masks_binary(kaggle_root: Path) -> None:
    samples = discover_samples(kaggle_root)
    image, mask, preview, error = ExtractionDataset(samples, 48, 24)[0]
    assert error == ""
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48) and preview.shape == (24, 24, 3)
    assert image.dtype == mask.dtype == preview.dtype == torch.uint8
    assert set(mask.unique().tolist()) == {0, 1}
    full = np.asarray(read_mask(samples[0].mask_path))
    assert abs(mask.float().mean().item() - full.mean()) < 0.02  # same foreground fraction after resizing


def test_mask_of_another_size_is_an_error(tmp_path: Path) -> None:
    _pair(tmp_path, "images/1.png", "masks/1.png")
    _save(tmp_path / "masks/1.png", np.zeros((5, 5), np.uint8))
    image, mask, preview, error = ExtractionDataset(discover_samples(tmp_path), 32, 16)[0]
    assert re.fullmatch(r".*masks/1.png: mask is 5×5 but its image is 20×16; masks must match their images", error)
    assert image.shape == (3, 32, 32) and not image.any() and not mask.any() and preview.shape == (16, 16, 3)


def test_random_split_is_deterministic_disjoint_and_complete() -> None:
    train, val = random_split(50, 0.2, seed=42)
    assert len(val) == 10 and len(train) == 40
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(50))
    again_train, again_val = random_split(50, 0.2, seed=42)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, random_split(50, 0.2, seed=7)[1])


@pytest.mark.parametrize("n_images, fraction", [(1, 0.2), (10, 0.0), (10, 1.0)])
def test_random_split_refuses_impossible_splits(n_images: int, fraction: float) -> None:
    with pytest.raises(FishsegError):
        random_split(n_images, fraction, seed=0)
