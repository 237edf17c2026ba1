"""Segmenter gives exactly what predict writes, for every kind of input, one by one or batched."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from fishseg.config import TrainConfig
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import THRESHOLD
from fishseg.inference.predict import PredictionResult, run_prediction
from fishseg.inference.segmenter import Segmentation, Segmenter
from fishseg.training.train import run_training
from tests.helpers import PAIRED_BATCH as BATCH, demo_photos, paired_prediction, paired_segmenter

KINDS: dict[str, Callable[[Path], Any]] = {  # how a user may hold a photo
    "str": str,
    "Path": lambda path: path,
    "PIL": Image.open,
    "array": lambda path: np.asarray(Image.open(path).convert("RGB")),
}


@pytest.fixture(scope="module")
def photos(kaggle_root: Path) -> list[Path]:
    return demo_photos(kaggle_root, 5)


@pytest.fixture(scope="module")
def segmenter(tiny_run: Path) -> Segmenter:
    return paired_segmenter(tiny_run)


@pytest.fixture(scope="module")
def predicted(tiny_run: Path, photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> PredictionResult:
    return paired_prediction(tiny_run, photos, tmp_path_factory.mktemp("predicted") / "out")


@pytest.fixture(scope="module")
def guided_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("guided") / "run"
    run_training(tiny_cache, run, TrainConfig(decoder="guided", epochs=1, batch_size=4), device="cpu")
    return run


def _rows(result: PredictionResult) -> list[dict[str, str]]:
    with result.csv.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_as_written(segmentations: list[Segmentation], result: PredictionResult) -> None:
    """Each segmentation's mask is predict's PNG pixel for pixel, and its figures are predict's CSV row."""
    assert len(segmentations) == len(result.masks) == len(_rows(result))
    for segmentation, mask, row in zip(segmentations, result.masks, _rows(result)):
        np.testing.assert_array_equal(segmentation.mask, np.asarray(Image.open(mask)) > 0)
        assert segmentation.probabilities.dtype == np.float32 and segmentation.probabilities.shape == (
            int(row["height"]), int(row["width"]))
        assert 0 <= segmentation.probabilities.min() and segmentation.probabilities.max() <= 1
        np.testing.assert_array_equal(segmentation.mask, segmentation.probabilities > THRESHOLD)
        assert segmentation.area_px == int(row["area_px"])
        assert segmentation.fish_fraction == pytest.approx(float(row["foreground_fraction"]), abs=5e-7)
        assert segmentation.bbox == tuple(int(row[key]) for key in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
        assert segmentation.mean_probability == pytest.approx(float(row["mean_probability"]), abs=5e-7)
    fractions = [segmentation.fish_fraction for segmentation in segmentations]
    assert 0 < min(fractions) and max(fractions) < 1  # the masks hold fish and background: the test has teeth


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_input_gives_predicts_mask_pixel_for_pixel(kind: str, segmenter: Segmenter,
                                                                photos: list[Path],
                                                                predicted: PredictionResult) -> None:
    _assert_as_written([segmenter(KINDS[kind](photo)) for photo in photos], predicted)


def test_a_list_of_mixed_inputs_gives_predicts_masks_in_order(segmenter: Segmenter, photos: list[Path],
                                                             predicted: PredictionResult) -> None:
    inputs = [convert(photo) for convert, photo in zip([*KINDS.values(), str], photos)]
    results = segmenter(inputs)
    assert isinstance(results, list)
    _assert_as_written(results, predicted)
    assert segmenter(tuple(inputs[:1]))[0].size == Image.open(photos[0]).size and segmenter([]) == []


def test_batched_equals_one_by_one(segmenter: Segmenter, photos: list[Path]) -> None:
    batched = dataclasses.replace(segmenter, batch_size=3)(photos)
    for together, photo in zip(batched, photos):
        alone = segmenter(photo)
        np.testing.assert_array_equal(together.mask, alone.mask)
        np.testing.assert_array_equal(together.probabilities, alone.probabilities)


def test_the_guided_decoder_agrees_with_predict(guided_run: Path, photos: list[Path], tmp_path: Path) -> None:
    predicted = run_prediction(guided_run, photos, tmp_path / "out", batch_size=BATCH, num_workers=0, device="cpu")
    guided = Segmenter.from_run(str(guided_run), device="cpu", batch_size=BATCH)
    _assert_as_written(guided(photos), predicted)
    _assert_as_written([guided(Image.open(photo)) for photo in photos], predicted)


def test_a_grayscale_photo_is_taken_as_predict_reads_its_file(segmenter: Segmenter, tiny_run: Path,
                                                              photos: list[Path], tmp_path: Path) -> None:
    """A PIL image of any mode is converted as files are; a grayscale array, refused, stacked as the message says
    gives the same."""
    gray = tmp_path / "gray.png"
    Image.open(photos[0]).convert("L").save(gray)
    predicted = run_prediction(tiny_run, [gray], tmp_path / "out", num_workers=0, device="cpu")
    stacked = np.stack([np.asarray(Image.open(gray))] * 3, axis=-1)
    for image in (Image.open(gray), stacked):
        np.testing.assert_array_equal(segmenter(image).mask, np.asarray(Image.open(predicted.masks[0])) > 0)


def test_the_overlay_is_predicts_and_leaves_the_photo_untouched(segmenter: Segmenter, photos: list[Path],
                                                                predicted: PredictionResult) -> None:
    photo = Image.open(photos[0]).convert("RGB")
    before = np.asarray(photo).copy()
    overlay = segmenter(photo).overlay(photo)
    np.testing.assert_array_equal(np.asarray(overlay), np.asarray(Image.open(predicted.out / "overlays" /
                                                                             predicted.masks[0].name)))
    np.testing.assert_array_equal(np.asarray(photo), before)
    with pytest.raises(FishsegError, match=r"overlay: the image is 10×10 but the mask 118×89; pass the image"):
        segmenter(photo).overlay(np.zeros((10, 10, 3), np.uint8))


def test_a_path_is_turned_upright_by_its_exif_tag_and_a_pil_image_is_taken_as_it_is(segmenter: Segmenter,
                                                                                      tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.new("RGB", (40, 30)).save(tmp_path / "sideways.jpg", exif=exif)
    assert segmenter(tmp_path / "sideways.jpg").mask.shape == (40, 30)
    assert segmenter(Image.open(tmp_path / "sideways.jpg")).mask.shape == (30, 40)


def _not_an_image(tmp_path: Path) -> Path:
    (tmp_path / "notes.png").write_text("not a png")
    return tmp_path / "notes.png"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: np.zeros((8, 8), np.uint8), r"image array of shape \(8, 8\): expected H×W×3 RGB .*np\.stack"),
    (lambda tmp: np.zeros((8, 8, 4), np.uint8), r"image array of shape \(8, 8, 4\): .*RGBA: array\[\.\.\., :3\]"),
    (lambda tmp: np.zeros((8, 8, 3), np.float32), r"image array of dtype float32: expected uint8 RGB values 0\.\.255"),
    (lambda tmp: np.zeros((0, 8, 3), np.uint8), r"an image of 8×0 pixels: nothing to segment"),
    (lambda tmp: tmp / "missing.png", r"missing\.png: cannot read image"),
    (_not_an_image, r"notes\.png: cannot read image"),
    (lambda tmp: 42, r"cannot segment a int: pass a PIL image, a path or an H×W×3 uint8 numpy array"),
    (lambda tmp: [np.zeros((8, 8, 3), np.uint8), None], r"cannot segment a NoneType"),
])
def test_bad_input_is_a_one_line_error(segmenter: Segmenter, tmp_path: Path, make: Callable[[Path], Any],
                                       message: str) -> None:
    with pytest.raises(FishsegError, match=message) as raised:
        segmenter(make(tmp_path))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("field, value, message", [("batch_size", 0, r"batch_size 0: expected a whole number >= 1"),
                                                   ("precision", "fp64", r"precision 'fp64'")])
def test_bad_settings_are_refused(segmenter: Segmenter, field: str, value: Any, message: str) -> None:
    with pytest.raises(FishsegError, match=message):
        dataclasses.replace(segmenter, **{field: value})


def test_fp16_on_the_cpu_is_refused_when_loading(tiny_run: Path) -> None:
    with pytest.raises(FishsegError, match="fp16.*: needs a CUDA GPU"):
        Segmenter.from_run(tiny_run, device="cpu", precision="fp16")
