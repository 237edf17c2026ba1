from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fishseg.features.extract
import fishseg.runtime
from fishseg.data.images import ExtractionDataset, apply_view, discover_samples
from fishseg.errors import FishsegError
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache, PartStore, parts_dir
from fishseg.models.backbone import load_backbone, save_random_backbone
from fishseg.runtime import default_batch_size, default_num_workers
from tests.helpers import TINY_LAYOUT, tiny_extract_config


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
            image, mask, preview, _ = dataset[index]
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


def test_finished_cache_is_kept_when_up_to_date_and_refused_when_stale(tmp_path: Path, kaggle_root: Path,
                                                                      tiny_backbone: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(kaggle_root, data)
    config, out = tiny_extract_config(tiny_backbone), tmp_path / "c.h5"
    run_extraction(data, out, config, num_workers=0, device="cpu")
    written = out.stat().st_mtime_ns
    assert run_extraction(data, out, config, num_workers=0, device="cpu") == out  # up to date: nothing to do
    assert out.stat().st_mtime_ns == written
    species = data / "Fish_Dataset" / "Fish_Dataset" / "Red Mullet"
    shutil.copytree(data / "Fish_Dataset" / "Fish_Dataset" / "Black Sea Sprat", species)
    for folder in ("Black Sea Sprat", "Black Sea Sprat GT"):
        (species / folder).rename(species / folder.replace("Black Sea Sprat", "Red Mullet"))
    first = next((data / "Fish_Dataset" / "Fish_Dataset" / "Hourse Mackerel" / "Hourse Mackerel").iterdir())
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    with pytest.raises(FishsegError, match="c.h5: stale: 6 added, 0 removed, 1 modified images under the data root; "
                                           "pass `overwrite=True`"):
        run_extraction(data, out, config, num_workers=0, device="cpu")
    other = dataclasses.replace(config, preview_size=16)
    with pytest.raises(FishsegError, match=r"c.h5: extracted with other settings \(preview_size 32 → 16\)"):
        run_extraction(data, out, other, num_workers=0, device="cpu")
    assert out.stat().st_mtime_ns == written
    run_extraction(data, out, config, num_workers=0, device="cpu", overwrite=True)
    with FeatureCache(out) as cache:
        assert len(cache) == 18 and cache.staleness(discover_samples(data)) == {"added": 0, "removed": 0, "modified": 0}


def test_skip_bad_leaves_unreadable_images_out_and_records_them(tmp_path: Path, kaggle_root: Path,
                                                               tiny_backbone: Path, tiny_cache: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(kaggle_root, data)
    bad = data / "Fish_Dataset" / "Fish_Dataset" / "Hourse Mackerel" / "Hourse Mackerel" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    config, out = tiny_extract_config(tiny_backbone), tmp_path / "c.h5"
    run_extraction(data, out, config, num_workers=0, device="cpu", skip_bad=True)
    bad_id = bad.relative_to(data).as_posix()
    with FeatureCache(out) as cache, FeatureCache(tiny_cache) as full:
        assert len(cache) == 11 and bad_id not in cache.image_ids
        assert [image_id for image_id, _ in cache.skipped] == [bad_id] and "cannot read image" in cache.skipped[0][1]
        kept = [full.image_ids.index(image_id) for image_id in cache.image_ids]
        np.testing.assert_array_equal(cache.masks(range(11)), full.masks(kept))
    assert not (tmp_path / "c.h5.parts").exists()


def test_a_relative_backbone_folder_is_recorded_as_an_absolute_path(tmp_path: Path, kaggle_root: Path,
                                                                     tiny_backbone: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_backbone.parent)
    config = dataclasses.replace(tiny_extract_config(tiny_backbone), backbone=tiny_backbone.name)
    run_extraction(kaggle_root, tmp_path / "c.h5", config, num_workers=0, device="cpu")
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.config.backbone == cache.backbone.name == str(tiny_backbone)


def test_layers_and_views_hold_what_the_backbone_computes_for_each_transformed_photo(
        tmp_path: Path, kaggle_root: Path) -> None:
    folder = save_random_backbone(tmp_path / "b", **{**TINY_LAYOUT, "num_hidden_layers": 2})
    config = dataclasses.replace(tiny_extract_config(folder), layers=(-1, 1), views=("hflip", "rot90", "transpose"))
    out = run_extraction(kaggle_root, tmp_path / "c.h5", config, batch_size=5, num_workers=0, device="cpu")
    backbone = load_backbone(config.backbone, config.mean, config.std, torch.device("cpu"))
    dataset = ExtractionDataset(discover_samples(kaggle_root), config.image_size, config.preview_size)
    with FeatureCache(out) as cache:
        assert cache.layers == (2, 1) and cache.views == ("identity", "hflip", "rot90", "transpose")
        image, mask, _, _ = dataset[7]
        for view in cache.views:
            expected = backbone(apply_view(image[None], view, (2, 3)), (2, 1)).numpy()
            np.testing.assert_allclose(cache.features([7], view), expected, atol=2e-3)
            np.testing.assert_array_equal(cache.masks([7], view), apply_view(mask[None], view, (1, 2)).numpy())
        np.testing.assert_array_equal(cache.masks([7], "transpose")[0], mask.numpy().T)
        assert not np.allclose(cache.features([7], "hflip"), cache.features([7])[:, :, ::-1], atol=1e-2)
    with pytest.raises(FishsegError, match=r"c.h5: extracted with other settings \(views hflip,rot90,transpose → "
                                           r"none\); pass `overwrite=True`"):
        run_extraction(kaggle_root, out, dataclasses.replace(config, views=()), num_workers=0, device="cpu")
    with pytest.raises(FishsegError, match=r"c.h5: extracted with other settings \(layers -1,1 → 1,-1\)"):
        run_extraction(kaggle_root, out, dataclasses.replace(config, layers=(1, -1)), num_workers=0, device="cpu")


@pytest.mark.parametrize("change, refusal", [
    (dict(image_size=62), r"`image_size=62`: not a multiple of the backbone's patch size 8; try 64$"),
    (dict(layers=(2,)), r"layers 2: the backbone has 1 block \(1 … 1, or -1 … -1 counting from the end\)$"),
    (dict(layers=(-2,)), r"layers -2: the backbone has 1 block"),
])
def test_settings_the_backbone_cannot_take_are_refused_before_advising_overwrite(
        tiny_cache: Path, kaggle_root: Path, tiny_backbone: Path, change: dict, refusal: str) -> None:
    config = dataclasses.replace(tiny_extract_config(tiny_backbone), **change)
    with pytest.raises(FishsegError, match=refusal):
        run_extraction(kaggle_root, tiny_cache, config, num_workers=0, device="cpu")


def _contents(path: Path) -> dict[str, object]:
    """Every dataset (values, dtype, chunks, compression) and every attribute of a cache but its creation time."""
    found: dict[str, object] = {}

    def visit(name: str, item: object) -> None:
        if isinstance(item, h5py.Dataset):
            found[name] = (item[()], item.dtype, item.chunks, item.compression)

    with h5py.File(path, "r") as file:
        found.update({f"attr {k}": v for k, v in file.attrs.items() if k != "created_at"})
        file.visititems(visit)
    return found


def test_the_writer_thread_writes_the_cache_of_the_serial_loop_bit_for_bit(
        tmp_path: Path, kaggle_root: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = dataclasses.replace(tiny_extract_config(tiny_backbone), views=("hflip", "rot90"))
    serial = run_extraction(kaggle_root, tmp_path / "serial.h5", config, batch_size=5, num_workers=1, device="cpu")
    monkeypatch.setattr(fishseg.features.extract, "THREADED_WRITES", frozenset({"cpu"}))  # the GPU's writer thread, on the CPU
    started = []
    monkeypatch.setattr(fishseg.features.extract.threading.Thread, "start",
                        lambda thread, start=threading.Thread.start: started.append(thread.name) or start(thread))
    threaded = run_extraction(kaggle_root, tmp_path / "threaded.h5", config, batch_size=5, num_workers=1,
                              device="cpu")
    assert "fishseg-part-writer" in started
    threaded_contents, serial_contents = _contents(threaded), _contents(serial)
    assert threaded_contents.keys() == serial_contents.keys() and "views/rot90" in serial_contents
    for name, value in serial_contents.items():
        if isinstance(value, tuple):
            np.testing.assert_array_equal(threaded_contents[name][0], value[0], err_msg=name)
            assert threaded_contents[name][1:] == value[1:], name
        else:
            np.testing.assert_array_equal(threaded_contents[name], value, err_msg=name)


@pytest.mark.parametrize("threaded", [frozenset(), frozenset({"cpu"})], ids=["serial", "writer thread"])
def test_a_failed_batch_keeps_the_batches_before_it_and_writes_none_after(
        threaded: frozenset[str], tmp_path: Path, kaggle_root: Path, tiny_backbone: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fishseg.features.extract, "THREADED_WRITES", threaded)
    data = tmp_path / "data"
    shutil.copytree(kaggle_root, data)
    samples = discover_samples(data)
    samples[5].image_path.write_bytes(samples[5].image_path.read_bytes()[:200])  # truncated PNG, in batch [4, 6)
    out = tmp_path / "c.h5"
    with pytest.raises(FishsegError, match=rf"{samples[5].image_id}: cannot read image .*\(pass `skip_bad=True` to "
                                           rf"leave such images out; finished batches are kept\)"):
        run_extraction(data, out, tiny_extract_config(tiny_backbone), batch_size=2, num_workers=0, device="cpu")
    written = sorted(path.name for path in parts_dir(out).glob("*.npz"))
    assert written == ["00000000-00000002.npz", "00000002-00000004.npz"] and not out.exists()
    assert PartStore(out, {"batch_size": 2, "image_ids": [s.image_id for s in samples]}).done() == [(0, 2), (2, 4)]


@pytest.mark.parametrize("cores, processes, workers", [(16, 1, 15), (64, 1, 16), (2, 1, 1), (1, 1, 1), (16, 2, 7),
                                                       (None, 1, 1)])
def test_a_gpu_gets_large_batches_and_most_of_the_cores_for_decoding(
        cores: int | None, processes: int, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fishseg.runtime.os, "cpu_count", lambda: cores)
    assert default_num_workers(torch.device("cuda"), processes) == default_num_workers(torch.device("cuda:1"),
                                                                                       processes) == workers
    assert default_batch_size(torch.device("cuda")) == 64


@pytest.mark.parametrize("cores, workers", [(16, 8), (2, 1), (64, 8), (None, 1)])
def test_the_cpu_keeps_batch_8_and_half_the_cores(cores: int | None, workers: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fishseg.runtime.os, "cpu_count", lambda: cores)
    assert default_num_workers(torch.device("cpu"), 2) == default_num_workers() == workers
    assert default_batch_size(torch.device("cpu")) == 8
