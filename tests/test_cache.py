from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fishseg.cache import CacheWriter, FeatureCache, PartStore
from fishseg.config import BackboneInfo, ExtractConfig
from fishseg.data import Sample
from fishseg.errors import FishsegError
from tests.helpers import write_toy_cache

CONFIG = ExtractConfig(backbone="toy", image_size=16, preview_size=4)
INFO = BackboneInfo("toy", "toy", 4, 3, 0, True)
SAMPLES = [Sample(f"{c}/{i}.png", Path("x"), Path("y"), c) for i, c in enumerate(["eel", "cod", "eel"])]


def _arrays(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (rng.normal(size=(3, 4, 4, 3)).astype(np.float16), rng.integers(0, 2, (3, 16, 16), dtype=np.uint8),
            rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))


def test_round_trip_keeps_every_array_and_the_config(tmp_path: Path) -> None:
    features, masks, previews = _arrays(np.random.default_rng(0))
    with CacheWriter(tmp_path / "c.h5", CONFIG, INFO, SAMPLES) as writer:
        writer.write(0, features[:2], masks[:2], previews[:2])
        writer.write(2, features[2:], masks[2:], previews[2:])
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.config == CONFIG and cache.backbone == INFO
        assert cache.image_ids == ["eel/0.png", "cod/1.png", "eel/2.png"]
        assert cache.class_names == ["cod", "eel"] and cache.class_index.tolist() == [1, 0, 1]
        np.testing.assert_array_equal(cache.features([0, 1, 2]), features)
        np.testing.assert_array_equal(cache.masks([2, 0]), masks[[2, 0]])
        np.testing.assert_array_equal(cache.previews([1, 1]), previews[[1, 1]])
        assert cache.file.attrs["grid_size"] == 4 and cache.file.attrs["feature_dim"] == 3
        assert cache.file["features"].chunks == (1, 4, 4, 3)
    assert not (tmp_path / "c.h5.partial").exists()


def test_fingerprint_depends_on_config_and_images(tmp_path: Path) -> None:
    a = write_toy_cache(tmp_path / "a.h5", seed=0)
    b = write_toy_cache(tmp_path / "b.h5", seed=1)  # same config and ids, other content
    c = write_toy_cache(tmp_path / "c.h5", n_images=10)
    d = write_toy_cache(tmp_path / "d.h5", image_size=64)
    fingerprints = [FeatureCache(path).fingerprint for path in (a, b, c, d)]
    assert fingerprints[0] == fingerprints[1]
    assert len(set(fingerprints[1:])) == 3


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path / "c.h5", CONFIG, INFO, SAMPLES) as writer:
            writer.write(0, *[a[:1] for a in _arrays(np.random.default_rng(0))])
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_part_store_resumes_a_matching_manifest_and_refuses_another(tmp_path: Path) -> None:
    manifest = {"batch_size": 2, "image_ids": ["a", "b", "c"]}
    PartStore.open(tmp_path / "c.h5", manifest).write(2, 3, features=np.ones((1, 4)))
    resumed = PartStore.open(tmp_path / "c.h5", manifest)
    assert resumed.done() == [(2, 3)]
    np.testing.assert_array_equal(resumed.read(2, 3)["features"], np.ones((1, 4)))
    other = {"batch_size": 2, "image_ids": ["a", "b"]}
    with pytest.raises(FishsegError, match="c.h5.parts: an interrupted extraction of other images or settings"):
        PartStore.open(tmp_path / "c.h5", other)
    assert PartStore.open(tmp_path / "c.h5", other, discard_other=True).done() == []
    assert [p.name for p in (tmp_path / "c.h5.parts").iterdir()] == ["manifest.json"]


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = write_toy_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as file:
        file.attrs["format_version"] = 99
    with pytest.raises(FishsegError, match="cache format v99, this fishseg .* reads v2 and v3; extract the cache again"):
        FeatureCache(path)


def test_a_format_2_cache_reads_as_one_layer_the_last_block_and_no_views(tmp_path: Path) -> None:
    path = write_toy_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as file:  # what fishseg wrote before format 3
        file.attrs["format_version"] = 2
        for name in ("layers", "num_blocks", "views"):
            del file.attrs[name]
    with FeatureCache(path) as cache:
        assert (cache.layers, cache.num_blocks, cache.views) == ((-1,), 0, ("identity",))
        assert cache.select_layers(()) == cache.select_layers((-1,)) == (-1,)
        np.testing.assert_array_equal(cache.features([0], layers=(-1,)), cache.file["features"][:1])
        with pytest.raises(FishsegError, match=r"the run needs layers 12 but .*c.h5 holds layers -1; extract with "
                                               r"--layers 12"):
            cache.select_layers((12,))


def test_layers_and_views_are_stored_side_by_side_and_read_by_name(tmp_path: Path) -> None:
    config = ExtractConfig(backbone="toy", image_size=16, preview_size=4, layers=(6, -1), views=("hflip", "rot90"))
    rng = np.random.default_rng(0)
    features, masks, previews = _arrays(rng)
    features = np.concatenate([features, features + 1], axis=-1)  # block 6, then block 12
    flipped = rng.normal(size=features.shape).astype(np.float16)
    with CacheWriter(tmp_path / "c.h5", config, INFO, SAMPLES, num_blocks=12) as writer:
        writer.write(0, features, masks, previews, {"hflip": flipped, "rot90": features})
    with FeatureCache(tmp_path / "c.h5") as cache:
        attrs = cache.file.attrs  # what h5dump shows
        assert attrs["layers"].tolist() == [6, 12] and attrs["num_blocks"] == 12
        assert attrs["views"] == "identity,hflip,rot90" and attrs["format_version"] == 3
        assert cache.select_layers(()) == (6, 12) and cache.select_layers((-1,)) == (12,)
        np.testing.assert_array_equal(cache.features([0, 2], layers=(12,)), features[[0, 2], ..., 3:])
        np.testing.assert_array_equal(cache.features([0, 2], layers=(12, 6)),
                                      np.concatenate([features[[0, 2], ..., 3:], features[[0, 2], ..., :3]], -1))
        np.testing.assert_array_equal(cache.features([1], "hflip"), flipped[[1]])
        np.testing.assert_array_equal(cache.masks([1], "hflip"), masks[[1], :, ::-1])
        np.testing.assert_array_equal(cache.masks([1], "rot90"), np.rot90(masks[[1]], 1, axes=(1, 2)))
        with pytest.raises(FishsegError, match=r"the run needs layers 9 but .*c.h5 holds layers 6,12; extract with "
                                               r"--layers 9"):
            cache.select_layers((9,))
        with pytest.raises(FishsegError, match="holds views identity, hflip, rot90, not vflip; extract with --views"):
            cache.features([0], "vflip")


def test_cache_missing_a_dataset_is_refused(tmp_path: Path) -> None:
    path = write_toy_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as file:
        del file["groups"]
    with pytest.raises(FishsegError, match="c.h5: fishseg cache without groups; extract the cache again"):
        FeatureCache(path)


def test_require_refuses_another_cache(tmp_path: Path) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "c.h5")) as cache:
        cache.require(cache.summary(), tmp_path / "run.json")
        with pytest.raises(FishsegError, match=r"run.json: made from cache 0123 \(backbone other, image_size 224\) "
                                               r"but .*c.h5 is cache \w+ \(backbone toy, image_size 32\)"):
            cache.require({"fingerprint": "0123", "backbone": "other", "image_size": 224}, tmp_path / "run.json")
        with pytest.raises(FishsegError, match="split.json: 1 image not in cache"):
            cache.indices_of(["class0/000.png", "nope.png"], tmp_path / "split.json")
        assert cache.indices_of(["class1/003.png", "class0/000.png"], tmp_path).tolist() == [3, 0]


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_compression_changes_storage_not_content(tmp_path: Path, compression: str) -> None:
    features, masks, previews = _arrays(np.random.default_rng(0))
    with CacheWriter(tmp_path / "c.h5", CONFIG, INFO, SAMPLES, compression) as writer:
        writer.write(0, features, masks, previews)
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.file["features"].compression == (None if compression == "none" else compression)
        np.testing.assert_array_equal(cache.features(range(3)), features)


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FishsegError, match="unknown compression 'zstd'"):
        CacheWriter(tmp_path / "c.h5", CONFIG, INFO, SAMPLES, "zstd")


def test_non_finite_features_are_refused_with_the_image_ids_and_an_empty_read_is_fine(tmp_path: Path) -> None:
    path = write_toy_cache(tmp_path / "c.h5", n_images=8)
    with h5py.File(path, "r+") as file:
        file["features"][2, 1, 1, 0], file["features"][5, 0, 0, 3] = np.inf, np.nan
    with FeatureCache(path) as cache:
        assert cache.features([]).shape == (0, 8, 8, 16)  # a torchrun rank idle for a batch reads nothing
        assert np.isfinite(cache.features([0, 1, 3])).all()
        with pytest.raises(FishsegError, match=r"c.h5: features of 2 images hold NaN or inf \(class1/005.png, "
                                               r"class0/002.png\); extract again"):
            cache.features([5, 0, 2])
