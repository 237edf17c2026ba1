"""Shared fixtures: tiny random-init backbones, generated datasets and caches. No network, no GPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never reach the Hub

from pathlib import Path

import pytest

from fishseg.config import TrainConfig
from fishseg.data.synthetic import write_demo_dataset
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.features.extract import run_extraction
from fishseg.models.backbone import save_random_backbone
from fishseg.training.train import run_training
from tests.helpers import SMALL_PHOTO, TINY_LAYOUT, tiny_extract_config, write_toy_cache


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_backbone(tmp_path_factory.mktemp("tiny-backbone"), **TINY_LAYOUT)


@pytest.fixture(scope="session")
def kaggle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("kaggle"), classes=2, images_per_class=6, size=SMALL_PHOTO)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, kaggle_root: Path, tiny_backbone: Path) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache.h5"
    return run_extraction(kaggle_root, out, tiny_extract_config(tiny_backbone), num_workers=0, device="cpu")


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A toy cache, a 3-epoch run on it, and its metrics; the report is in ``<run>/../report``."""
    root = tmp_path_factory.mktemp("eval")
    cache = write_toy_cache(root / "toy.h5", n_images=20)
    run_training(cache, root / "run", TrainConfig(epochs=3, batch_size=4, seed=3), device="cpu")
    return cache, root / "run", run_evaluation(cache, root / "run", root / "report", device="cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """A short run on ``tiny_cache``, whose backbone loads: enough for predict's argument checks."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    run_training(tiny_cache, run, TrainConfig(epochs=1, batch_size=4), device="cpu")
    return run
