from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fishseg.backbone import load_backbone
from fishseg.cache import FeatureCache
from fishseg.data import ExtractionDataset, discover_samples
from fishseg.errors import FishsegError
from fishseg.extract import run_extraction
from tests.helpers import tiny_extract_config


def test_cache_holds_what_the_backbone_computes_for_each_image(tiny_cache: Path, kaggle_root: Path,
                                                               tiny_backbone: Path) -> None:
    samples = discover_samples(kaggle_root)
    config = tiny_extract_config(tiny_backbone)
    backbone = load_backbone(config.backbone, config.mean, config.std, torch.device("cpu"))
    dataset = ExtractionDataset(samples, config.image_size, config.preview_size)
    with FeatureCache(tiny_cache) as cache:
        assert cache.image_ids == [s.image_id for s in samples]
        assert [cache.class_names[k] for k in cache.class_index] == [s.class_name for s in samples]
        assert cache.backbone.random_init and cache.config == config
        for index in (0, len(samples) - 1):
            image, mask, preview = dataset[index]
            expected = backbone(image[None]).numpy()
            np.testing.assert_allclose(cache.features([index]), expected, atol=2e-3)
            np.testing.assert_array_equal(cache.masks([index])[0], mask.numpy())
            np.testing.assert_array_equal(cache.previews([index])[0], preview.numpy())


def test_batching_and_workers_do_not_change_the_cache(tmp_path: Path, kaggle_root: Path, tiny_backbone: Path,
                                                      tiny_cache: Path) -> None:
    out = run_extraction(kaggle_root, tmp_path / "c.h5", tiny_extract_config(tiny_backbone), batch_size=5,
                         num_workers=1, device="cpu")
    with FeatureCache(out) as cache, FeatureCache(tiny_cache) as reference:
        assert cache.fingerprint == reference.fingerprint
        every = range(len(cache))
        np.testing.assert_allclose(cache.features(every), reference.features(every), atol=2e-3)
        np.testing.assert_array_equal(cache.masks(every), reference.masks(every))


def test_existing_cache_is_not_overwritten_without_the_flag(tmp_path: Path, kaggle_root: Path,
                                                           tiny_backbone: Path) -> None:
    out = tmp_path / "c.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(FishsegError, match="already exists; pass --overwrite"):
        run_extraction(kaggle_root, out, tiny_extract_config(tiny_backbone), num_workers=0, device="cpu")
    assert out.read_bytes() == b"keep me"


def test_image_size_must_be_a_multiple_of_the_patch(tmp_path: Path, kaggle_root: Path, tiny_backbone: Path) -> None:
    config = tiny_extract_config(tiny_backbone)
    bad = type(config)(backbone=config.backbone, image_size=60, preview_size=16)
    with pytest.raises(FishsegError, match="--image-size 60: not divisible by the backbone's patch size 8; try 56"):
        run_extraction(kaggle_root, tmp_path / "c.h5", bad, num_workers=0, device="cpu")
    assert list(tmp_path.iterdir()) == []
