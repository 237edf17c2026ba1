"""torchrun with the gloo backend on CPU: the results must equal a single-process run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.data.synthetic import write_demo_dataset
from fishseg.distributed import Ranks, SyncedBatchNorm, session, sync_batch_norm, torchrun_command
from fishseg.errors import FishsegError
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache
from fishseg.models.backbone import save_random_backbone
from fishseg.models.decoders import build_decoder
from fishseg.training.crossval import run_cross_validation
from fishseg.training.train import EpochResult, run_training
from tests.helpers import REPO, SMALL_PHOTO, TINY_LAYOUT, tiny_extract_config, write_toy_cache


def torchrun(script: str, *args: object) -> subprocess.CompletedProcess:
    command = [*torchrun_command(2), str(REPO / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_shards_are_contiguous_and_cover_everything_once() -> None:
    items = list(range(10))
    shards = [Ranks(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert Ranks().shard(items) == items and Ranks().main and not Ranks(1, 2).main
    assert Ranks(0, 2).shard(torch.tensor([7])).numel() == 0  # a batch smaller than the world leaves a rank idle


def test_per_batch_shares_join_in_the_order_of_one_process() -> None:
    rank0 = ([[0.1, 0.2], [0.5]], [[1.0, 0.0], [1.0]])
    rank1 = ([[0.3], []], [[0.5], []])
    joined = EpochResult.from_ranks([rank0, rank1])
    assert joined.image_losses == [0.1, 0.2, 0.3, 0.5] and joined.image_ious == [1.0, 0.0, 0.5, 1.0]
    assert joined.iteration_losses == pytest.approx([0.2, 0.5]) and joined.iteration_ious == pytest.approx([0.5, 1.0])


def test_synced_batch_norm_keeps_the_state_and_is_batch_norm_outside_a_process_group() -> None:
    torch.manual_seed(0)
    decoder = build_decoder("seed-cnn", 16)
    features = torch.randn(2, 16, 8, 8)
    reference = decoder(features)
    state = {key: value.clone() for key, value in decoder.state_dict().items()}
    synced = sync_batch_norm(build_decoder("seed-cnn", 16))
    synced.load_state_dict(state)  # same keys: a checkpoint of a torchrun run loads into a plain decoder
    assert sum(isinstance(module, SyncedBatchNorm) for module in synced.modules()) == 2
    assert not any(type(module) is nn.BatchNorm2d for module in synced.modules())
    torch.testing.assert_close(synced(features), reference)


def test_torchrun_extraction_equals_a_single_process_cache(tmp_path: Path) -> None:
    backbone = save_random_backbone(tmp_path / "backbone", **{**TINY_LAYOUT, "num_hidden_layers": 2})
    data = write_demo_dataset(tmp_path / "data", classes=2, images_per_class=5, size=SMALL_PHOTO, seed=3)
    config = dataclasses.replace(tiny_extract_config(backbone), layers=(1, 2), views=("vflip", "rot270"))
    single = run_extraction(data, tmp_path / "single.h5", config, batch_size=2, num_workers=0, device="cpu")
    result = torchrun("extract_features.py", "--data-root", data, "--out", tmp_path / "two.h5", "--backbone",
                      backbone, "--image-size", 64, "--preview-size", 32, "--layers", "1,2", "--views", "vflip,rot270",
                      "--batch-size", 2, "--num-workers", 0, "--device", "cpu")
    assert "rank 1 of 2" in result.stderr and not (tmp_path / "two.h5.parts").exists()
    assert result.stdout.count("cache ready") == 1
    with FeatureCache(tmp_path / "two.h5") as two, FeatureCache(single) as one:
        assert two.fingerprint == one.fingerprint and two.image_ids == one.image_ids
        everything = range(len(one))
        assert two.views == one.views == ("identity", "vflip", "rot270") and two.layers == one.layers == (1, 2)
        for view in one.views:
            np.testing.assert_array_equal(two.features(everything, view), one.features(everything, view))
        np.testing.assert_array_equal(two.masks(everything), one.masks(everything))
        np.testing.assert_array_equal(two.groups, one.groups)


def _history(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


def _values(rows: list[dict], prefix: str) -> np.ndarray:
    return np.array([[value for key, value in row.items() if key.startswith(prefix)] for row in rows])


@pytest.mark.parametrize("decoder", ["linear", "seed-cnn"])
def test_torchrun_training_equals_a_single_process_run(decoder: str, tmp_path: Path) -> None:
    # 31 images: 25 train in batches of 4, so the last batch holds one image and rank 0 sits it out.
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=31)
    config = TrainConfig(decoder=decoder, epochs=3, batch_size=4, lr=3e-3, seed=1, augment="flips")
    run_training(cache, tmp_path / "one", config, device="cpu")
    result = torchrun("train_decoder.py", "--cache", cache, "--out", tmp_path / "two", "--decoder", decoder,
                      "--epochs", 3, "--batch-size", 4, "--lr", 3e-3, "--seed", 1, "--augment", "flips",
                      "--stream", "--device", "cpu")  # streamed: each rank reads only its share of each batch
    assert result.stdout.count("run finished") == 1
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "split.json").read_text() == (two / "split.json").read_text()
    run = json.loads((two / "run.json").read_text())
    assert run["processes"] == 2 and run["best_epoch"] == json.loads((one / "run.json").read_text())["best_epoch"]
    history_one, history_two = _history(one), _history(two)
    for split in ("train", "val"):
        assert len(history_two["iterations"][split]) == len(history_one["iterations"][split])
    np.testing.assert_allclose(_values(history_two["epochs"], "train"), _values(history_one["epochs"], "train"),
                               rtol=1e-5, atol=1e-6)
    weights_one, weights_two = (load_file(folder / json.loads((folder / "run.json").read_text())["checkpoints"]["last"]
                                          ["file"]) for folder in (one, two))
    assert weights_one.keys() == weights_two.keys()
    if decoder == "linear":
        np.testing.assert_allclose(_values(history_two["epochs"], "val"), _values(history_one["epochs"], "val"),
                                   rtol=1e-5, atol=1e-6)
        for key in weights_one:
            torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-5, atol=1e-6)
        return
    # seed-cnn: a convolution's bias followed by batch norm has a true gradient of zero, so AdamW turns its
    # rounding noise into lr-sized steps; the bias, and the running mean that tracks it, then wander by up
    # to ~1e-2, and validation (which uses the running mean) by ~1e-3. One process run with 1 thread
    # instead of 2 differs from itself as much. Everything else agrees to rounding.
    wandering = {"layers.0.bias", "layers.3.bias", "layers.1.running_mean", "layers.4.running_mean"}
    for key in weights_one:
        tolerance = 5e-2 if key in wandering else 1e-4
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=0, atol=tolerance)
    np.testing.assert_allclose(_values(history_two["epochs"], "val"), _values(history_one["epochs"], "val"),
                               atol=1e-2)


def test_cross_validation_under_torchrun_scores_each_fold_once(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=20)
    config = TrainConfig(decoder="linear", epochs=2, batch_size=4, seed=1, folds=2)
    single = run_cross_validation(cache, tmp_path / "one", config, device="cpu")
    result = torchrun("train_decoder.py", "--cache", cache, "--out", tmp_path / "two", "--decoder", "linear",
                      "--epochs", 2, "--batch-size", 4, "--seed", 1, "--cv", 2, "--device", "cpu")
    assert result.stdout.count("cross-validation") == 1
    two = json.loads((tmp_path / "two" / "cv.json").read_text())
    assert [fold["n_images"] for fold in two["folds"]] == [fold["n_images"] for fold in single.folds]
    for name, value in single.summary.items():
        assert two["summary"][name]["mean"] == pytest.approx(value["mean"], abs=1e-5)


def test_more_processes_than_gpus_is_refused_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FishsegError, match="started 2 processes on this machine but it has 1 GPUs"):
        with session(torch.device("cuda")):
            pass


@pytest.mark.parametrize("command", ["evaluate", "predict", "probe", "demo", "bench"])
def test_single_process_commands_refuse_torchrun(command: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = str(tmp_path / "out")
    arguments = {"evaluate": ["--cache", "c.h5", "--run", "run", "--out", out],
                 "predict": ["image.png", "--run", "run", "--out", out], "probe": ["--cache", "c.h5"],
                 "demo": ["--out", out], "bench": []}[command]
    result = CliRunner().invoke(main, [command, *arguments])
    assert result.exit_code == 2 and f"`{command}` runs in one process" in result.output
    assert not (tmp_path / "out").exists()
