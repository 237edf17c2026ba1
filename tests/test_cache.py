from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from fishseg.config import BackboneInfo, ExtractConfig
from fishseg.data.images import Sample
from fishseg.errors import FishsegError
from fishseg.formats.cache import CacheWriter, FeatureCache, PartStore
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


def test_fingerprint_depends_on_config_images_and_content(tmp_path: Path) -> None:
    a = write_toy_cache(tmp_path / "a.h5", seed=0)
    again = write_toy_cache(tmp_path / "again.h5", seed=0)  # the same content written again
    b = write_toy_cache(tmp_path / "b.h5", seed=1)  # same config and ids, other content
    c = write_toy_cache(tmp_path / "c.h5", n_images=10)
    d = write_toy_cache(tmp_path / "d.h5", image_size=64)
    fingerprints = [FeatureCache(path).fingerprint for path in (a, again, b, c, d)]
    assert fingerprints[0] == fingerprints[1]
    assert len(set(fingerprints[1:])) == 4


def _write(path: Path, features: np.ndarray, masks: np.ndarray, previews: np.ndarray) -> FeatureCache:
    with CacheWriter(path, CONFIG, INFO, SAMPLES) as writer:
        writer.write(0, features, masks, previews)
    return FeatureCache(path)


def test_digests_are_of_each_images_stored_features_and_mask_not_its_preview(tmp_path: Path) -> None:
    features, masks, previews = _arrays(np.random.default_rng(0))
    edited = masks.copy()
    edited[1] = 1 - edited[1]  # one mask corrected
    with _write(tmp_path / "a.h5", features, masks, previews) as a, \
            _write(tmp_path / "b.h5", features, edited, previews) as b, \
            _write(tmp_path / "c.h5", features.astype(np.float32), masks, 255 - previews) as c:
        assert a.file.attrs["format_version"] == 4 and all(len(digest) == 32 for digest in a.digests.values())
        assert [image_id for image_id in a.image_ids if a.digests[image_id] != b.digests[image_id]] == ["cod/1.png"]
        assert a.fingerprint != b.fingerprint
        assert (c.digests, c.fingerprint) == (a.digests, a.fingerprint)  # stored as float16 alike; previews not covered
        with pytest.raises(FishsegError, match=r"run.json: made from cache \w+ \(backbone toy, image_size 16\) but "
                                               r".*b.h5 is cache \w+ \(backbone toy, image_size 16\); of its 3 images, "
                                               r"1 changed content \(cod/1.png\); pass the cache it was trained on, "
                                               r"or train again on this one$"):
            b.require(a.summary(), tmp_path / "run.json", a.digests)


def test_a_run_names_changed_and_missing_images_up_to_a_few(tmp_path: Path) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "c.h5", n_images=12)) as cache:
        recorded = {**{image_id: "0" * 32 for image_id in cache.image_ids[:7]}, "gone/1.png": "1" * 32}
        with pytest.raises(FishsegError, match=r"; of its 8 images, 7 changed content \(class0/000.png, "
                                               r"class1/001.png, class0/002.png, class1/003.png, class0/004.png and 2 "
                                               r"more\) and 1 is missing \(gone/1.png\), and .*c.h5 holds 5 images it "
                                               r"was not made from \(class1/007.png, .*class1/011.png\): a different "
                                               r"split; pass the cache"):
            cache.require({"fingerprint": "0123"}, tmp_path / "run.json", recorded)


def test_a_cache_of_the_same_images_and_one_more_is_refused_naming_the_added_image(tmp_path: Path) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "c.h5", n_images=13)) as cache:
        made_from = {image_id: cache.digests[image_id] for image_id in cache.image_ids[:12]}
        with pytest.raises(FishsegError, match=r"c.h5 is cache \w+ \(backbone toy, image_size 32\); its 12 images are "
                                               r"unchanged, but .*c.h5 holds 1 image it was not made from "
                                               r"\(class0/012.png\): a different split; pass the cache it was trained "
                                               r"on, or train again on this one$"):
            recorded = json.loads(json.dumps({**cache.summary(), "fingerprint": "0123", "images": 12}))  # as run.json
            cache.require(recorded, tmp_path / "run.json", made_from)


@pytest.mark.parametrize("change, named", [(dict(views=("hflip",)), "views none → hflip"),
                                           (dict(image_size=64, grid=16), "image_size 32 → 64")])
def test_a_cache_of_other_settings_is_refused_naming_the_settings_as_typed(tmp_path: Path, change: dict,
                                                                            named: str) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "a.h5")) as a, \
            FeatureCache(write_toy_cache(tmp_path / "b.h5", **change)) as b:
        with pytest.raises(FishsegError, match=rf"b.h5 is cache \w+ \(backbone toy, image_size \d+\); {named}; of its "
                                               rf"24 images, 24 changed content"):
            b.require(a.summary(), tmp_path / "run.json", a.digests)


def test_a_format_3_cache_has_no_recorded_content_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    path = write_toy_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as file:  # what fishseg wrote before format 4
        file.attrs["format_version"], file.attrs["fingerprint"] = 3, "0123456789abcdef"
        del file["digests"]
    with FeatureCache(path) as cache:
        assert cache.digests is None and cache.fingerprint == "0123456789abcdef"
        cache.require({"fingerprint": "0123456789abcdef"}, tmp_path / "run.json", {"class0/000.png": "0" * 32})
        with pytest.raises(FishsegError, match=r"is cache 0123456789abcdef \(backbone toy, image_size 32\); what "
                                               r"differs was not recorded; pass the"):
            cache.require({"fingerprint": "fedcba9876543210"}, tmp_path / "run.json", {"class0/000.png": "0" * 32})


def test_a_cache_with_an_image_never_written_is_not_completed(tmp_path: Path) -> None:
    features, masks, previews = _arrays(np.random.default_rng(0))
    with pytest.raises(ValueError, match="1 image never written"):
        with CacheWriter(tmp_path / "c.h5", CONFIG, INFO, SAMPLES) as writer:
            writer.write(0, features[:2], masks[:2], previews[:2])
    assert list(tmp_path.iterdir()) == []


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
    with pytest.raises(FishsegError, match=r"c.h5.parts: an interrupted extraction of other images or settings \(1 "
                                           r"image removed\); pass `overwrite=True`"):
        PartStore.open(tmp_path / "c.h5", other)
    assert PartStore.open(tmp_path / "c.h5", other, discard_other=True).done() == []
    assert [p.name for p in (tmp_path / "c.h5.parts").iterdir()] == ["manifest.json"]


def test_an_interrupted_extraction_of_other_settings_names_what_differs(tmp_path: Path) -> None:
    manifest = {"fishseg_version": "0.4", "extract_config": {"image_size": 448, "layers": [12], "views": []},
                "backbone": {"name": "vits16", "feature_dim": 384}, "batch_size": 8, "precision": "fp32",
                "image_ids": ["a", "b", "c"], "sources": [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]}
    PartStore.open(tmp_path / "c.h5", manifest)
    other = {**manifest, "extract_config": {"image_size": 224, "layers": [6, 12], "views": ["hflip"]},
             "backbone": {"name": "vitb16", "feature_dim": 768}, "batch_size": 16,
             "image_ids": ["b", "c", "d", "e"], "sources": [[1, 2, 3, 4], [9, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]}
    with pytest.raises(FishsegError, match=r"c.h5.parts: an interrupted extraction of other images or settings "
                                           r"\(image_size 448 → 224; layers 12 → 6,12; views none → hflip; backbone name "
                                           r"vits16 → vitb16; backbone feature_dim 384 → 768; batch_size 8 → 16; 2 "
                                           r"images added, 1 removed, 1 modified\); pass `overwrite=True` to discard it"):
        PartStore.open(tmp_path / "c.h5", other)
    with pytest.raises(FishsegError, match=r"other images or settings \(the images' order\)"):
        PartStore.open(tmp_path / "c.h5", {**manifest, "image_ids": ["c", "b", "a"]})


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = write_toy_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as file:
        file.attrs["format_version"] = 99
    with pytest.raises(FishsegError, match="cache format v99, this fishseg .* reads v2, v3 and v4; extract the cache "
                                           "again"):
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
                                               r"`layers=\(12,\)`"):
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
        assert attrs["views"] == "identity,hflip,rot90" and attrs["format_version"] == 4
        assert cache.select_layers(()) == (6, 12) and cache.select_layers((-1,)) == (12,)
        np.testing.assert_array_equal(cache.features([0, 2], layers=(12,)), features[[0, 2], ..., 3:])
        np.testing.assert_array_equal(cache.features([0, 2], layers=(12, 6)),
                                      np.concatenate([features[[0, 2], ..., 3:], features[[0, 2], ..., :3]], -1))
        np.testing.assert_array_equal(cache.features([1], "hflip"), flipped[[1]])
        np.testing.assert_array_equal(cache.masks([1], "hflip"), masks[[1], :, ::-1])
        np.testing.assert_array_equal(cache.masks([1], "rot90"), np.rot90(masks[[1]], 1, axes=(1, 2)))
        with pytest.raises(FishsegError, match=r"the run needs layers 9 but .*c.h5 holds layers 6,12; extract with "
                                               r"`layers=\(9,\)`"):
            cache.select_layers((9,))
        with pytest.raises(FishsegError, match="holds views identity, hflip, rot90, not vflip; extract with `views`"):
            cache.features([0], "vflip")


@pytest.mark.parametrize("dataset", ["groups", "digests"])  # digests: format 4 records each image's content
def test_cache_missing_a_dataset_is_refused(tmp_path: Path, dataset: str) -> None:
    path = write_toy_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as file:
        del file[dataset]
    with pytest.raises(FishsegError, match=f"c.h5: fishseg cache without {dataset}; extract the cache again"):
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
    with pytest.raises(FishsegError, match="compression 'zstd': expected one of none, lzf, gzip"):
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
