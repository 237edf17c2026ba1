"""Training on a cache with several pixel classes: losses, the objective, runs, refusals, stratified splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fishseg
from fishseg.classes import Classes
from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.data.splits import dominant_classes, split_indices
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import confusion_matrices, dataset_mean_iou
from fishseg.formats.cache import FeatureCache, count_class_pixels
from fishseg.models.decoders import build_decoder, load_checkpoint, read_checkpoint_meta, segment
from fishseg.training.losses import balanced_weights, class_losses, default_loss
from fishseg.training.train import Objective, TrainingData, run_epoch
from tests.helpers import write_toy_cache
from tests.test_distributed import torchrun

CLASSES = ("background", "a", "b")
QUICK = dict(epochs=8, batch_size=4, lr=3e-3, seed=1, device="cpu")


@pytest.fixture(scope="module")
def classes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_cache(tmp_path_factory.mktemp("classes") / "toy.h5", n_images=24, classes=CLASSES)


@pytest.fixture(scope="module")
def classes_run(classes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    fishseg.train(classes_cache, out, **QUICK)
    return out


def _logits_and_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 6, 6, generator=generator), torch.randint(0, 4, (3, 6, 6), generator=generator)


def test_ce_is_torch_cross_entropy_per_image_and_weighted_as_torch_weighs() -> None:
    logits, target = _logits_and_target()
    expected = F.cross_entropy(logits, target, reduction="none").mean((1, 2))
    assert torch.allclose(class_losses(logits, target, "ce"), expected)
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    for image in range(3):  # one image: its loss is F.cross_entropy's weighted mean
        weighted = F.cross_entropy(logits[image:image + 1], target[image:image + 1], weight=weights)
        assert float(class_losses(logits, target, "ce", weights)[image]) == pytest.approx(float(weighted), rel=1e-5)


def test_multiclass_dice_is_zero_on_a_perfect_prediction_and_adds_to_ce() -> None:
    _, target = _logits_and_target()
    perfect = 50 * F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert class_losses(perfect, target, "dice").abs().max() < 1e-4
    logits, _ = _logits_and_target(1)
    dice = class_losses(logits, target, "dice")
    assert torch.all((dice > 0) & (dice < 1))
    assert torch.allclose(class_losses(logits, target, "ce+dice"), class_losses(logits, target, "ce") + dice)
    # an absent class predicted absent scores 1, so its weight does not move a perfect prediction's loss
    assert class_losses(perfect, target, "dice", torch.tensor([1.0, 2.0, 3.0, 4.0])).abs().max() < 1e-4


def test_balanced_weights_are_inverse_frequency_over_the_classes_present() -> None:
    weights = balanced_weights(np.array([600, 300, 100, 0]))
    assert weights.tolist() == pytest.approx([1000 / (3 * 600), 1000 / (3 * 300), 1000 / (3 * 100), 0.0])
    assert weights.dtype == np.float32
    assert (default_loss(Classes()), default_loss(Classes.several(CLASSES))) == ("bce", "ce")


def test_a_run_on_classes_trains_with_ce_and_its_checkpoint_carries_the_classes(classes_cache: Path,
                                                                                 classes_run: Path) -> None:
    record = json.loads((classes_run / "run.json").read_text())
    assert record["train_config"]["loss"] == "ce"  # the default with classes
    best = classes_run / record["checkpoints"]["best"]["file"]
    meta = read_checkpoint_meta(best)
    assert meta.classes == CLASSES and isinstance(meta.colours, tuple) and isinstance(meta.colours[1], tuple)
    assert meta.pixel_classes == Classes.several(CLASSES)
    decoder, _ = load_checkpoint(best)
    assert decoder.layers[-1].out_channels == len(CLASSES)
    epochs = json.loads((classes_run / "history.json").read_text())["epochs"]
    assert epochs[-1]["train_loss"] < 0.7 * epochs[0]["train_loss"]
    assert max(epoch["val_iou"] for epoch in epochs) > 0.6  # all background would score about 0.25


def test_val_iou_is_the_dataset_miou_of_the_validation_images(classes_cache: Path, classes_run: Path) -> None:
    record = json.loads((classes_run / "run.json").read_text())
    last = classes_run / record["checkpoints"]["last"]["file"]
    decoder, meta = load_checkpoint(last)
    val_ids = json.loads((classes_run / "split.json").read_text())["val"]
    with FeatureCache(classes_cache) as cache, torch.no_grad():
        rows = cache.indices_of(val_ids, classes_run)
        masks = torch.from_numpy(cache.masks(rows))
        logits = segment(decoder.eval(), torch.from_numpy(cache.features(rows)), masks.shape[-1])
    confusion = confusion_matrices(meta.pixel_classes.labels(logits), masks, len(CLASSES))
    history = json.loads((classes_run / "history.json").read_text())["epochs"]
    assert history[-1]["val_iou"] == pytest.approx(dataset_mean_iou(confusion), abs=1e-6)
    assert meta.val_iou == pytest.approx(history[-1]["val_iou"])


def test_streamed_and_in_memory_training_keep_the_class_indices_alike(classes_cache: Path, tmp_path: Path) -> None:
    options = dict(QUICK, epochs=2, loss="ce+dice", class_weights="balanced", augment="flips")
    for name, stream in (("memory", False), ("streamed", True)):
        fishseg.train(classes_cache, tmp_path / name, stream=stream, **options)
    histories = [json.loads((tmp_path / name / "history.json").read_text()) for name in ("memory", "streamed")]
    assert histories[0]["iterations"] == histories[1]["iterations"]
    assert histories[0]["epochs"][-1]["val_iou"] == histories[1]["epochs"][-1]["val_iou"]


def test_an_epoch_pools_the_confusion_of_its_batches(classes_cache: Path) -> None:
    with FeatureCache(classes_cache) as cache:
        data = TrainingData.open(cache, False)
        objective = Objective.of(cache, TrainConfig(loss="dice", class_weights="balanced"))
        decoder = build_decoder("linear", 16, 3)
        result = run_epoch(decoder, data.split(np.arange(10)), 4, torch.device("cpu"), objective=objective)
    assert result.confusion.shape == (3, 3) and result.confusion.sum() == 10 * 32 * 32
    assert len(result.image_ious) == 10 and result.score == dataset_mean_iou(torch.from_numpy(result.confusion))


@pytest.mark.parametrize("binary, options, refusal", [
    (False, {"loss": "bce"}, r"holds 3 classes: background, a, b; `loss='bce'` is for binary masks; use one of "
                             r"ce, dice, ce\+dice"),
    (False, {"loss": "bce+dice"}, "is for binary masks"),
    (True, {"loss": "ce"}, r"holds binary masks; `loss='ce'` needs a cache extracted with pixel classes"),
    (True, {"loss": "ce+dice"}, "needs a cache extracted with pixel classes"),
    (True, {"class_weights": "balanced"}, "holds binary masks; `class_weights='balanced'` weighs several classes"),
])
def test_a_loss_or_weights_that_do_not_fit_the_cache_are_refused(binary: bool, options: dict, refusal: str,
                                                                 classes_cache: Path, tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "binary.h5", n_images=12) if binary else classes_cache
    with pytest.raises(FishsegError, match=refusal):
        fishseg.train(cache, tmp_path / "run", **QUICK, **options)
    assert not (tmp_path / "run").exists()


def test_balanced_weights_need_the_pixel_counts_of_a_newer_cache(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "old.h5", n_images=12, classes=CLASSES)
    with h5py.File(cache, "a") as file:
        del file["image_class_pixels"]
    with pytest.raises(FishsegError, match="an older cache that did not count pixels per class"):
        fishseg.train(cache, tmp_path / "run", **QUICK, class_weights="balanced")
    fishseg.train(cache, tmp_path / "run", **dict(QUICK, epochs=1))  # unweighted, it trains


def test_the_cli_trains_with_class_weights_and_refuses_a_binary_loss_in_one_line(classes_cache: Path,
                                                                                 tmp_path: Path) -> None:
    common = ["train", "--cache", str(classes_cache), "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "ok"), "--class-weights", "balanced",
                                       "--loss", "ce+dice"])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "no"), "--loss", "bce"])
    assert refused.exit_code == 2 and "is for binary masks" in refused.output
    assert "Traceback" not in refused.output


def test_dominant_class_is_the_largest_foreground_class() -> None:
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, :2] = 2  # 8 pixels of class 2
    masks[0, 3, :3] = 1  # 3 of class 1
    masks[1, 0, :2], masks[1, 1, :2] = 1, 2  # a tie: the lower index
    assert dominant_classes(count_class_pixels(masks, len(CLASSES))).tolist() == [2, 1, 0]


def test_grouped_splits_stratify_by_the_dominant_class_and_keep_groups_apart(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=32, classes=CLASSES)
    with h5py.File(cache, "a") as file:
        # 8 groups of 4, each of one dominant class (image i's is 1 + i mod 2): unstratified, folds of 2 groups
        # often validate one class only (seeds 0 to 5 all have such a fold)
        file["groups"][...] = np.arange(32) // 8 * 2 + np.arange(32) % 2
        file["class_index"][...] = 0  # one species folder: only the pixel classes can stratify
    with FeatureCache(cache) as opened:
        dominant = dominant_classes(opened.image_class_pixels)
        assert dominant.tolist() == [1, 2] * 16
        for fold in range(4):
            train, val, groups = split_indices(opened, TrainConfig(split="grouped", folds=4, fold=fold))
            assert not set(groups[train]) & set(groups[val])
            assert set(dominant[val].tolist()) == {1, 2}  # every fold validates both classes
        train, val, groups = split_indices(opened, TrainConfig(split="grouped", val_fraction=0.25))
        assert not set(groups[train]) & set(groups[val]) and set(dominant[val].tolist()) == {1, 2}


def test_cross_validation_trains_and_scores_every_fold_on_classes(classes_cache: Path, tmp_path: Path) -> None:
    fishseg.train(classes_cache, tmp_path / "cv", **dict(QUICK, epochs=1), folds=2, split="grouped")
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert [fold["fold"] for fold in cv["folds"]] == [1, 2] and cv["status"] == "finished"
    for fold in (1, 2):
        record = json.loads((tmp_path / "cv" / f"fold-{fold}" / "run.json").read_text())
        assert record["train_config"]["loss"] == "ce"
        assert read_checkpoint_meta(tmp_path / "cv" / f"fold-{fold}" / record["checkpoints"]["last"]["file"]
                                    ).classes == CLASSES
        metrics = json.loads((tmp_path / "cv" / f"fold-{fold}" / "report" / "metrics.json").read_text())
        assert metrics["pooled_iou"] == pytest.approx(metrics["pixel_classes"]["miou"])
        assert cv["folds"][fold - 1]["pooled_iou"] == pytest.approx(metrics["pixel_classes"]["miou"])
        for name in CLASSES:
            assert cv["folds"][fold - 1][f"iou:{name}"] == metrics["pixel_classes"]["per_class"][name]["iou"]
    for name in CLASSES:
        ious = [fold[f"iou:{name}"] for fold in cv["folds"]]
        assert cv["summary"][f"iou:{name}"] == pytest.approx({"mean": np.mean(ious), "std": np.std(ious)})


def test_a_sweep_on_classes_trains_scores_and_compares_with_class_losses(classes_cache: Path,
                                                                         tmp_path: Path) -> None:
    fishseg.sweep(classes_cache, tmp_path / "sweep", loss=["ce", "dice"], epochs=1, batch_size=4, device="cpu")
    configs = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["configs"]
    assert sorted(entry["train_config"]["loss"] for entry in configs) == ["ce", "dice"]
    with (tmp_path / "sweep" / "leaderboard.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row[f"iou:{name}"] != "" for row in rows for name in CLASSES)
    fishseg.sweep(classes_cache, tmp_path / "default", epochs=1, batch_size=4, device="cpu")
    default = json.loads((tmp_path / "default" / "sweep.json").read_text())["configs"]
    assert [entry["train_config"]["loss"] for entry in default] == ["ce"]  # no loss swept: the cache's default
    with pytest.raises(FishsegError, match="is for binary masks"):
        fishseg.sweep(classes_cache, tmp_path / "refused", loss=["ce", "bce"], epochs=1, device="cpu")
    assert not (tmp_path / "refused").exists()


def test_a_grouped_split_falls_back_to_the_image_class_when_no_pixel_class_dominates_enough_images(
        tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=6, classes=("background", "a", "b", "c"))
    with FeatureCache(cache) as opened:
        assert np.bincount(dominant_classes(opened.image_class_pixels)).max() < 3  # too few for 3 stratified folds
        folds = [split_indices(opened, TrainConfig(split="grouped", folds=3, fold=fold))[1] for fold in range(3)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(6))  # by species folder (3 images each) instead


def test_torchrun_training_on_classes_equals_a_single_process_run(tmp_path: Path) -> None:
    """Each rank's confusion matrix joins the others': the validation mIoU is the one-process run's."""
    # 31 images: 25 train in batches of 4, so the last batch holds one image and rank 0 sits it out.
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=31, classes=CLASSES)
    options = ["--decoder", "linear", "--epochs", 2, "--batch-size", 4, "--lr", 3e-3, "--seed", 1, "--loss", "ce+dice",
               "--class-weights", "balanced", "--device", "cpu"]
    single = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "one"),
                                       *map(str, options)])
    assert single.exit_code == 0, single.output
    torchrun("train_decoder.py", "--cache", cache, "--out", tmp_path / "two", *options, "--stream")
    one, two = (json.loads((tmp_path / name / "history.json").read_text())["epochs"] for name in ("one", "two"))
    for key in ("train_loss", "train_iou", "val_loss", "val_iou"):
        assert [row[key] for row in two] == pytest.approx([row[key] for row in one], rel=1e-5, abs=1e-6)
