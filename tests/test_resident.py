"""The cache held whole on the training device: uploaded in chunks, chosen by the GPU's free memory, and
training from it exactly as from memory or the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fishseg.training.resident as resident
import fishseg.training.train as train_module
from fishseg.config import IDENTITY, TrainConfig
from fishseg.formats.cache import FeatureCache, feature_name
from fishseg.training.resident import DEVICE_MARGIN, ResidentViews, fits_on_device, resident_bytes, upload
from fishseg.training.train import TrainingData, train_run
from tests.helpers import write_toy_cache

CONFIG = TrainConfig(epochs=3, batch_size=4, lr=3e-3, seed=3, augment="views")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_cache(tmp_path_factory.mktemp("resident") / "toy.h5", n_images=21, views=("hflip",))


def test_upload_in_chunks_equals_one_whole_read(cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resident, "CHUNK_BYTES", 3000)  # 8×8×16 float16 = 2 KiB an image: one image a chunk
    with FeatureCache(cache_path) as cache:
        everything = np.arange(len(cache))
        features = upload(cache.features, cache.file[feature_name(IDENTITY)], torch.device("cpu"), torch.float32)
        assert features.dtype == torch.float32
        assert torch.equal(features, torch.from_numpy(cache.features(everything)).float())
        assert torch.equal(upload(cache.masks, cache.file["masks"], torch.device("cpu")),
                           torch.from_numpy(cache.masks(everything)))
        views = ResidentViews(cache, torch.device("cpu"), None)
        assert list(views) == [] and views["hflip"].dtype == torch.float16 and list(views) == ["hflip"]
        assert torch.equal(views["hflip"], torch.from_numpy(cache.features(everything, "hflip")))


def test_the_gpu_holds_the_cache_when_it_fits_with_the_margin(cache_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with FeatureCache(cache_path) as cache:
        half = resident_bytes(cache, torch.float16, False)
        assert half == 21 * (2 * 8 * 8 * 16 * 2 + 32 * 32)  # two views of float16 features, uint8 masks
        assert resident_bytes(cache, torch.float32, True) == 21 * (2 * 8 * 8 * 16 * 4 + 32 * 32 + 8 * 8 * 3)
        gpu = torch.device("cuda", 0)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (half + DEVICE_MARGIN, 80 << 30))
        assert fits_on_device(cache, gpu, torch.float16, False)
        assert not fits_on_device(cache, gpu, torch.float32, False)
        assert not fits_on_device(cache, torch.device("cpu"), torch.float16, False)


def test_a_cache_that_fits_the_device_is_held_even_when_host_memory_is_short(
        cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "available_memory", lambda: 1)
    with FeatureCache(cache_path) as cache:
        assert TrainingData.open(cache, None).streamed
        monkeypatch.setattr(train_module, "fits_on_device", lambda *args: True)
        data = TrainingData.open(cache, None, dtype=torch.float32)
        assert not data.streamed and data.features[train_module.IDENTITY].dtype == torch.float32
        assert data.masks is not None and data.masks.dtype == torch.uint8
        assert TrainingData.open(cache, True).streamed  # asked to stream: streamed


def _iterations(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())["iterations"]


def test_resident_in_the_compute_dtype_trains_exactly_like_streamed_and_in_memory(
        cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed = in memory (float16 as stored) = held as float32 in one-image chunks, views augmentation
    included, bit for bit."""
    monkeypatch.setattr(resident, "CHUNK_BYTES", 3000)
    with FeatureCache(cache_path) as cache:
        for name, stream, dtype in (("streamed", True, None), ("memory", False, None),
                                    ("float32", False, torch.float32)):
            train_run(TrainingData.open(cache, stream, dtype=dtype), tmp_path / name, CONFIG)
    histories = [_iterations(tmp_path / name) for name in ("streamed", "memory", "float32")]
    assert histories[0] == histories[1] == histories[2] and len(histories[0]["train"]) == 3 * 5  # 17 train images, batch 4
