"""Prediction with several pixel classes: label PNGs, overlays with a legend, per-class areas, the Segmenter's class
maps and the ONNX export's N×C softmax; and the drawing helpers they share."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fishseg.classes import Classes
from fishseg.config import TrainConfig
from fishseg.data.images import Sample
from fishseg.drawing import LEGEND_BACKGROUND, OVERLAY_ALPHA, label_image, legend, tint_classes, with_legend
from fishseg.formats.cache import CacheWriter, FeatureCache
from fishseg.formats.runs import RunFolder
from fishseg.inference.predict import CSV_HEADER, csv_header, run_prediction
from fishseg.inference.segmenter import Segmentation, Segmenter
from fishseg.models.decoders import build_decoder
from fishseg.results import PredictionResult
from fishseg.training.train import run_training
from tests.helpers import TINY_IMAGE_SIZE, demo_photos, paired_prediction, paired_segmenter

CLASSES = Classes.several(("background", "cod", "haddock", "reef"))


@pytest.fixture(scope="module")
def classes_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_run`` with its best decoder replaced by a random-init seed-cnn of four classes, its last layer scaled
    up so that every class wins somewhere: what predict writes of such a run, not how good it is."""
    run = tmp_path_factory.mktemp("classes") / "run"
    shutil.copytree(tiny_run, run)
    folder = RunFolder(run)
    record, _, meta = folder.load()
    torch.manual_seed(0)
    decoder = build_decoder(meta.decoder, meta.in_dim, CLASSES.channels)
    with torch.no_grad():
        decoder.layers[-1].weight.mul_(40)
    meta = dataclasses.replace(meta, classes=CLASSES.names, colours=CLASSES.colours)
    record.checkpoints["best"] = record.checkpoints["last"] = folder.write_checkpoint(record.best_epoch, decoder, meta)
    folder.write_record(record)
    return run


@pytest.fixture(scope="module")
def species_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained on ``tiny_cache`` made a cache of species classes (each image's fish pixels of its species'
    class, as ``extract --classes species`` stores them): train's own run folder and checkpoint, whose backbone
    loads for predict."""
    folder = tmp_path_factory.mktemp("species")
    with FeatureCache(tiny_cache) as cache:
        everything = range(len(cache))
        species = ("background", *cache.class_names)
        config = dataclasses.replace(cache.config, mask_format="species", classes=species)
        samples = [Sample(image_id, Path("unused"), Path("unused"), cache.class_names[k])
                   for image_id, k in zip(cache.image_ids, cache.class_index)]
        masks = cache.masks(everything) * (1 + cache.class_index[:, None, None]).astype(np.uint8)
        with CacheWriter(folder / "species.h5", config, cache.backbone, samples, groups=cache.groups,
                         num_blocks=cache.num_blocks) as writer:
            writer.write(0, cache.features(everything), masks, cache.previews(everything))
    run_training(folder / "species.h5", folder / "run", TrainConfig(epochs=3, batch_size=4, lr=3e-3, loss="ce"),
                 device="cpu")
    return folder / "run"


@pytest.fixture(scope="module")
def photos(kaggle_root: Path) -> list[Path]:
    return demo_photos(kaggle_root, 3)


@pytest.fixture(scope="module")
def segmenter(classes_run: Path) -> Segmenter:
    return paired_segmenter(classes_run)


@pytest.fixture(scope="module")
def predicted(classes_run: Path, photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> PredictionResult:
    return paired_prediction(classes_run, photos, tmp_path_factory.mktemp("predicted") / "out")


def _labels(height: int = 30, width: int = 40) -> np.ndarray:
    labels = np.zeros((height, width), np.uint8)
    labels[2:12, 3:20], labels[15:25, 10:30], labels[5:9, 32:38] = 1, 2, 3
    return labels


def test_a_label_png_keeps_the_class_indices_and_the_class_colours_as_palette(tmp_path: Path) -> None:
    label_image(_labels(), CLASSES).save(tmp_path / "labels.png")
    image = Image.open(tmp_path / "labels.png")
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), _labels())
    assert image.getpalette()[:3 * len(CLASSES)] == [value for colour in CLASSES.colours for value in colour]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[20, 20], CLASSES.colours[2])
    with pytest.raises(ValueError, match=r"expected H×W uint8 class indices, got int64 \(30, 40\)"):
        label_image(_labels().astype(np.int64), CLASSES)


def test_tinting_by_class_blends_each_class_colour_and_leaves_the_background() -> None:
    grey = (100, 100, 100)
    tinted = np.asarray(tint_classes(Image.new("RGB", (40, 30), grey), _labels(), CLASSES)).astype(int)
    labels = _labels()
    assert (tinted[labels == 0] == grey).all()
    for index in range(1, len(CLASSES)):
        expected = OVERLAY_ALPHA * np.array(CLASSES.colours[index]) + (1 - OVERLAY_ALPHA) * np.array(grey)
        assert np.abs(tinted[labels == index] - expected).max() <= 1


def test_the_legend_shows_every_class_but_the_background_beside_the_image() -> None:
    photo = Image.new("RGB", (40, 30), (100, 100, 100))
    combined = np.asarray(with_legend(photo, CLASSES))
    strip = combined[:, 40:]
    assert combined.shape[0] == 30 and strip.shape[1] == legend(CLASSES, 30).width > 0
    np.testing.assert_array_equal(combined[:, :40], np.asarray(photo))
    shown = {tuple(pixel) for pixel in strip.reshape(-1, 3)}
    assert set(CLASSES.colours[1:]) <= shown and CLASSES.colours[0] != LEGEND_BACKGROUND
    many = Classes.several(tuple(f"class {k}" for k in range(12)))
    assert legend(many, 30).width > legend(CLASSES, 30).width  # 11 names do not fit under one another: columns


def test_a_segmentation_of_class_probabilities_labels_each_pixel_by_their_arg_max() -> None:
    coarse = torch.softmax(torch.randn(len(CLASSES), 8, 8, generator=torch.Generator().manual_seed(0)) * 3, 0)
    result = Segmentation.upsampled(coarse, (30, 20), CLASSES)
    assert result.classes == CLASSES and result.size == (30, 20)
    assert result.labels.shape == (20, 30) and result.labels.dtype == np.uint8
    assert result.class_probabilities.shape == (len(CLASSES), 20, 30)
    np.testing.assert_allclose(result.class_probabilities.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(result.labels, result.class_probabilities.argmax(0))
    np.testing.assert_array_equal(result.mask, result.labels > 0)
    np.testing.assert_allclose(result.probabilities, 1 - result.class_probabilities[0], atol=1e-6)
    assert list(result.area_px_by_class) == list(CLASSES.names) and sum(result.area_px_by_class.values()) == 600
    assert result.area_px == 600 - result.area_px_by_class["background"]
    assert len(np.unique(result.labels)) == len(CLASSES)  # every class somewhere: the test has teeth
    with pytest.raises(ValueError, match=r"expected H×W uint8 labels of the mask's shape \(20, 30\), got none"):
        Segmentation(result.mask, result.probabilities, CLASSES)


def test_a_binary_segmentation_has_two_classes_from_its_mask() -> None:
    result = Segmentation.upsampled(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)), (30, 20))
    assert result.classes == Classes() and result.mask_image().mode == "L"
    np.testing.assert_array_equal(result.labels, result.mask)
    np.testing.assert_allclose(result.class_probabilities.sum(0), 1, atol=1e-6)
    assert result.area_px_by_class == {"background": 600 - result.area_px, "fish": result.area_px}
    assert csv_header(Classes()) == CSV_HEADER


def test_the_segmenter_knows_its_classes_and_gives_a_softmax_over_them(segmenter: Segmenter,
                                                                       photos: list[Path]) -> None:
    assert segmenter.classes == CLASSES
    images = torch.randint(0, 256, (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), dtype=torch.uint8)
    with torch.inference_mode():
        probabilities = segmenter.forward(images, None)
    assert probabilities.shape == (2, len(CLASSES), TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    result = segmenter(photos[0])
    width, height = Image.open(photos[0]).size
    assert result.labels.shape == (height, width) and result.class_probabilities.shape == (len(CLASSES), height, width)
    np.testing.assert_allclose(result.class_probabilities.sum(0), 1, atol=1e-5)


def _rows(result: PredictionResult) -> list[dict[str, str]]:
    with result.csv.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_run_trained_on_species_classes_predicts_label_pngs_of_its_classes(species_run: Path, kaggle_root: Path,
                                                                            tmp_path: Path) -> None:
    photos = sorted(path for path in kaggle_root.rglob("*.png") if " GT" not in str(path))
    result = run_prediction(species_run, photos, tmp_path / "out", num_workers=0, device="cpu")
    segmenter = Segmenter.from_run(species_run, device="cpu")
    assert segmenter.classes.names == ("background", *sorted({photo.parent.name for photo in photos}))
    with result.csv.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == csv_header(segmenter.classes) and "area_px:background" in header
    seen = set()
    for mask, photo in zip(result.masks, photos):
        labels = np.asarray(Image.open(mask))
        assert Image.open(mask).mode == "P" and set(np.unique(labels)) <= set(range(len(segmenter.classes)))
        np.testing.assert_array_equal(labels, segmenter(photo).labels)
        seen |= set(np.unique(labels).tolist())
    assert 0 in seen and len(seen) >= 2  # background and fish of some species (a random backbone: not which)


def test_predict_writes_label_pngs_with_the_class_palette(predicted: PredictionResult, segmenter: Segmenter,
                                                          photos: list[Path]) -> None:
    seen = set()
    for mask, photo in zip(predicted.masks, photos):
        image = Image.open(mask)
        assert image.mode == "P" and image.size == Image.open(photo).size
        assert image.getpalette()[:3 * len(CLASSES)] == [value for colour in CLASSES.colours for value in colour]
        labels = np.asarray(image)
        assert set(np.unique(labels)) <= set(range(len(CLASSES)))
        np.testing.assert_array_equal(labels, segmenter(photo).labels)  # what the Segmenter gives in memory
        seen |= set(np.unique(labels).tolist())
    assert len(seen) >= 3  # several classes predicted: the test has teeth


def test_predict_lists_each_class_area(predicted: PredictionResult) -> None:
    with predicted.csv.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == [*CSV_HEADER[:-1], "area_px:background", "area_px:cod", "area_px:haddock", "area_px:reef",
                      "error"]
    for row, mask in zip(_rows(predicted), predicted.masks):
        counts = np.bincount(np.asarray(Image.open(mask)).ravel(), minlength=len(CLASSES))
        assert [int(row[f"area_px:{name}"]) for name in CLASSES.names] == counts.tolist()
        assert int(row["area_px"]) == counts[1:].sum() and row["error"] == ""


def test_predicts_overlay_is_the_segmenters_with_a_legend_beside_the_photo(predicted: PredictionResult,
                                                                          segmenter: Segmenter,
                                                                          photos: list[Path]) -> None:
    written = Image.open(predicted.out / "overlays" / predicted.masks[0].name)
    photo = Image.open(photos[0])
    assert written.height == photo.height and written.width > photo.width
    np.testing.assert_array_equal(np.asarray(written), np.asarray(segmenter(photo).overlay(photo)))


def test_an_unreadable_image_gets_a_row_as_wide_as_the_header(classes_run: Path, photos: list[Path],
                                                             tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("not a png")
    result = run_prediction(classes_run, [photos[0], tmp_path / "bad.png"], tmp_path / "out", num_workers=0,
                            device="cpu", skip_bad=True)
    rows = _rows(result)
    assert len(result.skipped) == 1 and rows[1]["area_px:reef"] == "" and "cannot read image" in rows[1]["error"]


def test_the_export_gives_the_class_softmax_and_names_the_classes(classes_run: Path, segmenter: Segmenter,
                                                                  tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from fishseg.inference.export import INPUT_NAME, export_onnx

    result = export_onnx(classes_run, tmp_path / "model.onnx")
    side = TINY_IMAGE_SIZE
    assert result.classes == CLASSES and result.output.shape == ("N", len(CLASSES), side, side)
    assert json.loads(result.metadata["fishseg_classes"]) == list(CLASSES.names)
    assert json.loads(result.metadata["fishseg_colours"]) == [list(colour) for colour in CLASSES.colours]
    assert "fishseg_threshold" not in result.metadata
    images = np.random.default_rng(0).integers(0, 256, (3, 3, side, side), dtype=np.uint8)
    got = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: images})[0]
    with torch.inference_mode():
        expected = segmenter.forward(torch.from_numpy(images), None).numpy()
    assert got.shape == (3, len(CLASSES), side, side) and np.abs(got - expected).max() <= 1e-3
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999
