"""Shared fixtures: tiny random-init backbones, generated datasets and caches. No network, no GPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never reach the Hub

from pathlib import Path

import pytest

from fishseg.backbone import save_random_backbone
from fishseg.demo import write_demo_dataset
from fishseg.extract import run_extraction
from tests.helpers import SMALL_PHOTO, TINY_LAYOUT, tiny_extract_config


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
