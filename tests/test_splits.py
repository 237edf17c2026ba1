"""Leakage-aware splits: near-duplicate groups, grouped splits and folds, cross-validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.data.splits import (duplicates_across, grouped_folds, grouped_split, groups_from_names,
                                 near_duplicate_groups, random_folds, split_indices, thumbnails)
from fishseg.errors import FishsegError
from fishseg.formats.cache import FeatureCache
from tests.helpers import F4K_SAMPLE, interrupt_at_pass, write_toy_cache


def _photos(n: int, seed: int = 0) -> np.ndarray:
    """Distinct random 'photos' (smooth blobs), N×64×64×3."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (n, 6, 6, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((64, 64), Image.Resampling.BICUBIC)) for c in coarse])


def test_flips_rotations_crops_and_colour_changes_are_grouped_with_their_original() -> None:
    originals = _photos(6)
    copies = np.concatenate([
        originals[:, ::-1],  # vertical flip
        np.rot90(originals, 1, axes=(1, 2)),
        np.rot90(originals[:, :, ::-1], 3, axes=(1, 2)),  # mirrored and rotated
        np.clip(originals * 0.8 + 30, 0, 255).astype(np.uint8),  # darker, less contrast
        np.stack([np.asarray(Image.fromarray(o[2:62, 2:62]).resize((64, 64))) for o in originals]),  # small crop
    ])
    groups = near_duplicate_groups(thumbnails(np.concatenate([originals, copies])))
    assert len(np.unique(groups)) == 6
    assert all(len(set(groups[k::6])) == 1 for k in range(6))  # every copy joins its own original


def test_grouped_split_never_puts_a_group_on_both_sides() -> None:
    groups = np.repeat(np.arange(20), 5)
    classes = np.repeat(np.arange(20) % 4, 5)
    train, val = grouped_split(groups, classes, 0.2, seed=42)
    assert duplicates_across(train, val, groups) == 0 and not set(groups[train]) & set(groups[val])
    assert len(val) == 20 and sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert len(set(classes[val])) == 4  # stratified: every class is validated
    random_train, random_val = random_folds(100, 5, seed=42)[0]
    assert duplicates_across(random_train, random_val, groups) > 10  # what a random split leaks


def test_folds_cover_every_image_once() -> None:
    groups, classes = np.repeat(np.arange(12), 3), np.repeat(np.arange(12) % 2, 3)
    for folds in (grouped_folds(groups, classes, 3, seed=0), random_folds(36, 3, seed=0)):
        assert sorted(np.concatenate([val for _, val in folds]).tolist()) == list(range(36))
    with pytest.raises(FishsegError, match="12 groups of near-duplicates are too few for 20 grouped folds; "
                                           "use `folds=12` or fewer"):
        grouped_folds(groups, classes, 20, seed=0)


def test_groups_from_names() -> None:
    ids = ["fish_01_a.png", "fish_02_b.png", "fish_01_c.png"]
    assert groups_from_names(ids, r"^fish_\d+").tolist() == [0, 1, 0]
    with pytest.raises(FishsegError, match="no match in image id fish_02_b.png"):
        groups_from_names(ids, r"_01_")


def test_training_on_a_grouped_split_reports_no_leak(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=30)
    with h5py.File(cache, "a") as file:
        file["groups"][...] = np.arange(30) // 3  # ten triplets of near-duplicates
    with FeatureCache(cache) as opened:
        train, val, groups = split_indices(opened, TrainConfig(split="grouped"))
        assert duplicates_across(train, val, groups) == 0
        train, val, groups = split_indices(opened, TrainConfig())
        assert duplicates_across(train, val, groups) > 0


def test_cross_validation_writes_each_fold_and_the_mean(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "cv"), "--cv", "3",
                                       "--epochs", "2", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert [fold["n_images"] for fold in cv["folds"]] == [4, 4, 4]
    assert cv["summary"]["mean_iou"]["mean"] == pytest.approx(np.mean([f["mean_iou"] for f in cv["folds"]]))
    assert f"mean_iou {cv['summary']['mean_iou']['mean']:.4f} ±" in result.output
    for fold in (1, 2, 3):
        assert (tmp_path / "cv" / f"fold-{fold}" / "report" / "metrics.json").is_file()


@pytest.mark.parametrize("command, remedy", [
    (["train"], "use --val-fraction 0.25 or more, --split random, or add images"),
    (["train", "--cv", "5"], "use --cv 4 or fewer, --split random, or add images"),
    (["sweep", "--lr", "1e-3,1e-2"], "use --val-fraction 0.25 or more"),
])
def test_a_grouped_split_too_fine_for_the_classes_is_refused_before_anything_is_written(
        tmp_path: Path, command: list[str], remedy: str) -> None:
    """4 images a class make no 5 stratified folds: one line, exit 2, no folder created, an existing one as it was
    (sklearn's ValueError came after the folder, its lock or a running cv.json, was written)."""
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)  # 4 images in each of 2 classes
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", existing):
        result = CliRunner().invoke(main, [*command, "--cache", str(cache), "--out", str(out), "--split", "grouped",
                                           "--epochs", "1", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert "too few images per class for " in result.output and "(the largest, class0, has 4); " in result.output
        assert remedy in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "new").exists() and [path.name for path in existing.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("per_class", [1, 2, 3, 4, 7])
def test_a_refused_grouped_split_suggests_a_val_fraction_that_works(per_class: int) -> None:
    groups, classes = np.arange(2 * per_class), np.repeat(["a", "b"], per_class)
    with pytest.raises(FishsegError) as refused:
        grouped_split(groups, classes, 0.1, seed=0)
    suggested = re.search(r"use `val_fraction=([\d.]+)` or more", str(refused.value))
    if per_class == 1:  # no two folds: only another split method
        assert suggested is None and "use `split='random'`, or add images" in str(refused.value)
        return
    train, val = grouped_split(groups, classes, float(suggested.group(1)), seed=0)
    assert len(train) and len(val) and len(train) + len(val) == 2 * per_class


def test_a_cross_validation_that_cannot_run_leaves_nothing_and_one_on_disk_is_described_as_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """13 folds of 12 images are refused before cv.json is written; a 3-fold cross-validation stopped after its
    first fold is described as 3-fold and interrupted (not as the K asked now, nor as running)."""
    cache, out = write_toy_cache(tmp_path / "toy.h5", n_images=12), tmp_path / "cv"
    train = ["train", "--cache", str(cache), "--out", str(out), "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(main, [*train, "--cv", "13"])
    assert result.exit_code == 2 and "12 images: too few for 13 folds; use --cv 12 or fewer" in result.output
    assert not out.exists()
    interrupt_at_pass(monkeypatch, 3)  # fold 1 trained and scored; fold 2 stopped before its first epoch
    assert CliRunner().invoke(main, [*train, "--cv", "3"]).exit_code == 130
    monkeypatch.undo()
    result = CliRunner().invoke(main, [*train, "--cv", "2"])
    assert result.exit_code == 2, result.output
    assert (f"{out}: already holds a 3-fold cross-validation (interrupted, 1 of 3 folds scored); pass --resume to "
            f"continue it") in result.output
    assert CliRunner().invoke(main, [*train, "--resume"]).exit_code == 0
    cv = json.loads((out / "cv.json").read_text())
    assert cv["status"] == "finished" and len(cv["folds"]) == 3


@pytest.mark.skipif(not F4K_SAMPLE.is_dir(), reason=f"{F4K_SAMPLE} not present")
def test_f4k_source_groups_never_cross_a_grouped_split_and_the_finder_is_precise() -> None:
    files = sorted((F4K_SAMPLE / "images").iterdir())
    names = groups_from_names([f.name for f in files], r"^fish_\d+")
    classes = np.zeros(len(files), dtype=int)
    train, val = grouped_split(names, classes, 0.34, seed=1)
    assert not set(names[train]) & set(names[val])
    previews = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224))) for f in files])
    found = near_duplicate_groups(thumbnails(previews))
    same_found = (found[:, None] == found[None]) & ~np.eye(len(files), dtype=bool)
    same_source = names[:, None] == names[None]
    precision = (same_found & same_source).sum() / same_found.sum()
    recall = (same_found & same_source).sum() / (same_source & ~np.eye(len(files), dtype=bool)).sum()
    # Measured: precision 1.000, recall 0.059 (35 groups). These are video frames of moving fish, not
    # flips or crops of one photo: the finder never merges sources but links few frames.
    assert precision == 1.0 and recall >= 0.05
