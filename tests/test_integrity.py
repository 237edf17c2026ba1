"""Every number belongs to the data it claims: a run, its evaluation and its saved scores are never paired with a
cache whose content changed (issue 19, item 1), end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter

from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.errors import FishsegError
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import INTERRUPTED, RunFolder
from fishseg.training.crossval import run_cross_validation
from fishseg.training.train import run_training
from tests.helpers import TINY_IMAGE_SIZE, interrupt_at_pass, write_toy_cache


def _invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def _dilate_masks(data: Path) -> int:
    """Grow every mask under ``data`` by a few pixels, as a user correcting them would; returns how many."""
    masks = sorted(data.rglob("* GT/*.png"))
    for path in masks:
        Image.open(path).filter(ImageFilter.MaxFilter(9)).save(path)
    return len(masks)


def test_runs_evaluations_and_resumes_refuse_a_cache_whose_masks_changed(
        tmp_path: Path, kaggle_root: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, cache, m1, m2 = tmp_path / "data", tmp_path / "m.h5", tmp_path / "m1", tmp_path / "m2"
    shutil.copytree(kaggle_root, data)
    extract = ["extract", "--data-root", data, "--out", cache, "--backbone", tiny_backbone, "--image-size",
               TINY_IMAGE_SIZE, "--preview-size", 32, "--num-workers", 0, "--device", "cpu"]
    assert _invoke(*extract)[0] == 0
    train = ["train", "--cache", cache, "--epochs", 2, "--batch-size", 4, "--device", "cpu", "--out"]
    assert _invoke(*train, m1)[0] == 0
    assert _invoke("evaluate", "--cache", cache, "--run", m1, "--device", "cpu")[0] == 0
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):  # a run stopped in its 2nd epoch
        interrupt_at_pass(patched, 3)
        run_training(cache, tmp_path / "stopped", TrainConfig(epochs=2, batch_size=4), device="cpu")
    assert RunFolder(tmp_path / "stopped").read_record().status == INTERRUPTED
    before = FeatureCache(cache).fingerprint

    written = cache.stat().st_mtime_ns
    assert _invoke(*extract)[0] == 0 and cache.stat().st_mtime_ns == written  # unchanged data: up to date, kept
    assert _invoke(*extract, "--overwrite")[0] == 0  # extracted again from unchanged data: the same content
    assert FeatureCache(cache).fingerprint == before
    assert _invoke("evaluate", "--cache", cache, "--run", m1, "--device", "cpu")[0] == 0

    assert _dilate_masks(data) == 12
    assert _invoke(*extract, "--overwrite")[0] == 0
    with FeatureCache(cache) as changed:
        assert changed.fingerprint != before
    assert _invoke(*train, m2)[0] == 0

    status, output = _invoke("compare", m1, m2, "--out", tmp_path / "board", "--device", "cpu")
    assert status == 2 and output.count("\n") == 1, output
    after = RunFolder(m2).read_record().cache["fingerprint"]
    assert (f"{m1} and {m2} were trained on different caches ({before} at {cache} vs "
            f"{after} at {cache}); of their 2 shared validation images, 2 changed "
            f"content (") in output
    assert not (tmp_path / "board").exists()

    status, output = _invoke("evaluate", "--cache", cache, "--run", m1, "--device", "cpu")
    assert status == 2 and output.count("\n") == 1, output
    assert "run.json: made from cache" in output and "; of its 12 images, 12 changed content (" in output
    assert output.rstrip().endswith("and 7 more); pass the cache it was trained on, or train again on this one")

    status, output = _invoke(*train, tmp_path / "stopped", "--resume")
    assert status == 2 and output.count("\n") == 1, output
    assert "stopped/run.json: made from cache" in output and "; of its 12 images, 12 changed content (" in output
    assert RunFolder(tmp_path / "stopped").read_record().epochs_done == 1  # nothing trained on the new masks


def test_a_run_records_the_content_of_its_images(tiny_cache: Path, tiny_run: Path) -> None:
    split = json.loads((tiny_run / "split.json").read_text())
    with FeatureCache(tiny_cache) as cache:
        for name in ("train", "val"):
            assert split["digests"][name] == [cache.digests[image_id] for image_id in split[name]]


def test_a_cross_validation_is_not_resumed_on_changed_content_and_keeps_its_results(tmp_path: Path) -> None:
    cache, config = write_toy_cache(tmp_path / "toy.h5", n_images=20), TrainConfig(epochs=1, batch_size=4, folds=2)
    run_cross_validation(cache, tmp_path / "cv", config, device="cpu")
    finished = (tmp_path / "cv" / "cv.json").read_text()
    write_toy_cache(cache, n_images=20, seed=5)  # the same images and settings, other content
    with pytest.raises(FishsegError, match=r"fold-1/run.json: made from cache .*; of its 20 images, 20 changed "
                                           r"content \(.* and 15 more\); pass the cache it was trained on"):
        run_cross_validation(cache, tmp_path / "cv", config, device="cpu", resume=True)
    assert (tmp_path / "cv" / "cv.json").read_text() == finished
