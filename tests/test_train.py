from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import fishseg.training.train as train_module
from fishseg.config import TrainConfig
from fishseg.data.images import apply_view
from fishseg.errors import FishsegError
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import RunFolder, RunRecord
from fishseg.models.decoders import load_checkpoint
from fishseg.training.train import (InMemorySplit, StreamedSplit, TrainingData, dihedral, image_losses,
                                    learning_rate_schedule, run_training)
from tests.helpers import write_toy_cache

TOY = TrainConfig(epochs=8, batch_size=4, lr=3e-3, seed=1)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, RunRecord]:
    root = tmp_path_factory.mktemp("toy")
    cache = write_toy_cache(root / "toy.h5", n_images=30)
    return cache, root / "run", run_training(cache, root / "run", TOY, device="cpu")


def test_training_learns_a_learnable_toy_set(toy_run: tuple[Path, Path, RunRecord]) -> None:
    _, run_dir, _ = toy_run
    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert len(epochs) == TOY.epochs
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert max(e["val_iou"] for e in epochs) > 0.8


def test_run_folder_records_config_split_history_and_checkpoints(toy_run: tuple[Path, Path, RunRecord]) -> None:
    _, run_dir, run = toy_run
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert files == {"history.json", "run.json", "split.json", "checkpoints/epoch-0008.safetensors",
                     f"checkpoints/epoch-{run.best_epoch:04d}.safetensors"}  # the best and the last epoch only
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded == run.to_json() and RunRecord.from_json(recorded, run_dir / "run.json") == run
    assert (run.status, run.epochs_done, recorded["epochs_planned"]) == ("finished", TOY.epochs, TOY.epochs)
    assert run.train_config == TOY and "resume" not in run.checkpoints  # a finished run keeps no optimizer state
    assert run.split == {"method": "random", "n_train": 24, "n_val": 6, "groups": "near-duplicates",
                         "val_with_duplicate_in_train": 0}  # the toy cache has no near-duplicates
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["val"]) == 6 and not set(split["val"]) & set(split["train"])
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["iterations"]["train"]) == TOY.epochs * 6  # 24 images / batch 4
    assert len(history["iterations"]["val"]) == TOY.epochs * 2  # 6 images / batch 4 → 4 + 2
    assert run.train_seconds == pytest.approx(sum(row["seconds"] for row in history["epochs"]))
    best_epoch = max(history["epochs"], key=lambda e: e["val_iou"])
    _, best = load_checkpoint(run_dir / run.checkpoints["best"].file)
    _, last = load_checkpoint(run_dir / run.checkpoints["last"].file)
    assert (best.epoch, best.val_iou) == (run.best_epoch, run.best_val_iou) == (
        best_epoch["epoch"], best_epoch["val_iou"])
    assert last.epoch == TOY.epochs and best.cache_fingerprint == run.cache["fingerprint"]


def test_same_seed_gives_the_same_history(toy_run: tuple[Path, Path, RunRecord], tmp_path: Path) -> None:
    cache, run_dir, _ = toy_run
    run_training(cache, tmp_path / "again", TOY, device="cpu")
    first = json.loads((run_dir / "history.json").read_text())
    second = json.loads((tmp_path / "again" / "history.json").read_text())
    assert [e["val_iou"] for e in first["epochs"]] == [e["val_iou"] for e in second["epochs"]]
    assert first["iterations"] == second["iterations"]


def test_streaming_from_hdf5_trains_exactly_like_in_memory(toy_run: tuple[Path, Path, RunRecord],
                                                           tmp_path: Path) -> None:
    cache, run_dir, _ = toy_run
    streamed = run_training(cache, tmp_path / "streamed", TOY, device="cpu", stream=True)
    assert streamed.features == "streamed from HDF5"
    in_memory = json.loads((run_dir / "history.json").read_text())
    assert json.loads((tmp_path / "streamed" / "history.json").read_text())["iterations"] == in_memory["iterations"]


def test_memory_or_streaming_follows_the_free_memory(toy_run: tuple[Path, Path, RunRecord],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with FeatureCache(toy_run[0]) as cache:
        indices = np.arange(10)
        needed = cache.bytes_per_image() * len(cache)
        assert cache.bytes_per_image() == 8 * 8 * 16 * 2 + 32 * 32  # float16 features + uint8 mask
        monkeypatch.setattr(train_module, "available_memory", lambda: 2 * needed + 2)
        assert isinstance(TrainingData.open(cache, None).split(indices), InMemorySplit)
        assert isinstance(TrainingData.open(cache, None, processes=2).split(indices), StreamedSplit)  # a copy each
        monkeypatch.setattr(train_module, "available_memory", lambda: 2 * needed - 2)
        assert isinstance(TrainingData.open(cache, None).split(indices), StreamedSplit)
        assert isinstance(TrainingData.open(cache, False).split(indices), InMemorySplit)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=10)
    real_segment, calls = train_module.segment, []

    def poisoned_after_first_epoch(*args: object) -> torch.Tensor:
        calls.append(1)
        logits = real_segment(*args)
        return logits * float("nan") if len(calls) > 3 else logits  # epoch 1: 2 train + 1 val batches

    monkeypatch.setattr(train_module, "segment", poisoned_after_first_epoch)
    with pytest.raises(FishsegError, match="loss is NaN or infinite: the decoder diverged on finite features; "
                                           "lower `lr`"):
        run_training(cache, tmp_path / "run", TrainConfig(epochs=3, batch_size=4), device="cpu")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (record["status"], record["epochs_done"]) == ("failed", 1) and record["failure"].startswith("loss is NaN")
    _, last = load_checkpoint(tmp_path / "run" / record["checkpoints"]["last"]["file"])
    assert last.epoch == 1
    assert len(RunFolder(tmp_path / "run").read_history(RunFolder(tmp_path / "run").read_record())["epochs"]) == 1


@pytest.mark.parametrize("decoder, floor", [("linear", 0.55), ("seed-cnn", 0.8), ("progressive", 0.8),
                                            ("guided", 0.7)])
def test_every_decoder_learns_the_toy_set(decoder: str, floor: float, toy_run: tuple[Path, Path, RunRecord],
                                          tmp_path: Path) -> None:
    """Floors measured here: linear 0.63 (one logit per 4×4-pixel patch, no context), guided 0.78 (the toy
    previews are noise: its guide only distracts), the others > 0.85."""
    run = run_training(toy_run[0], tmp_path / decoder, dataclasses.replace(TOY, decoder=decoder), device="cpu")
    epochs = json.loads((tmp_path / decoder / "history.json").read_text())["epochs"]
    assert epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"]
    assert run.best_val_iou > floor


def test_losses_hand_worked() -> None:
    logits = torch.tensor([[[0.0, 0.0]]])  # probability 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0]]])
    bce = float(image_losses(logits, target, "bce"))
    assert bce == pytest.approx(math.log(2))
    dice = float(image_losses(logits, target, "dice"))  # 1 - (2·0.5 + 1) / (1 + 1 + 1)
    assert dice == pytest.approx(1 - 2 / 3)
    assert float(image_losses(logits, target, "bce+dice")) == pytest.approx(bce + dice)


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    config = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1)
    scheduler = learning_rate_schedule(optimizer, config, steps_per_epoch=5)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(rates[5:], rates[6:])) and rates[-1] < 0.02
    assert learning_rate_schedule(optimizer, TrainConfig(), 5) is None


def test_flips_transform_grid_mask_and_guide_together() -> None:
    generator = torch.Generator().manual_seed(0)
    coarse = (torch.rand(3, 8, 8, generator=generator) > 0.5).to(torch.uint8)
    masks = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2×2-pixel blocks

    def block_means(m: torch.Tensor) -> torch.Tensor:  # 4×4-pixel patches: commutes with flips and rotations
        return m.float().reshape(3, 4, 4, 4, 4).mean((2, 4))

    def halved(m: torch.Tensor) -> torch.Tensor:  # the guide: an RGB preview at half the mask size
        return (m[:, ::2, ::2] * 255)[..., None].repeat(1, 1, 1, 3)  # exact on 2×2 blocks, so it commutes too

    features = block_means(masks)[..., None].repeat(1, 1, 1, 5)
    seen = set()
    for _ in range(20):
        flipped_features, flipped_masks, flipped_guides, nothing = dihedral(generator, features, masks, halved(masks),
                                                                            None)
        assert torch.equal(flipped_features[..., 0], block_means(flipped_masks))
        assert torch.equal(flipped_guides, halved(flipped_masks)) and nothing is None
        seen.add(flipped_masks.numpy().tobytes())
    assert len(seen) > 4  # several of the 8 transforms occur


def test_augment_views_sees_each_image_in_a_stored_view_drawn_from_the_seed(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=20, views=("hflip", "rot90"))
    with FeatureCache(cache) as opened:
        data = TrainingData.open(opened, False)
        memory, streamed = data.split(np.arange(20)), TrainingData.open(opened, True).split(np.arange(20))
        positions, view_ids = torch.tensor([3, 0, 7, 5]), torch.zeros(20, dtype=torch.long)
        view_ids[[0, 7]] = torch.tensor([1, 2])  # image 0 flipped, image 7 rotated, the others as they are
        (features, masks, _), = memory.batches([positions], view_ids)
        (streamed_features, streamed_masks, _), = streamed.batches([positions], view_ids)
        torch.testing.assert_close(features, streamed_features)
        torch.testing.assert_close(masks, streamed_masks)
        torch.testing.assert_close(features[1], torch.from_numpy(opened.features([0], "hflip")[0]))
        torch.testing.assert_close(masks[2], torch.from_numpy(opened.masks([7])[0]).rot90(1, (0, 1)))
        torch.testing.assert_close(masks[0], torch.from_numpy(opened.masks([3])[0]))
        assert set(data.features) == {"identity", "hflip", "rot90"}  # read when first asked for
    config = TrainConfig(epochs=3, batch_size=4, lr=3e-3, seed=1, augment="views")
    first = run_training(cache, tmp_path / "a", config, device="cpu")
    run_training(cache, tmp_path / "b", config, device="cpu", stream=True)
    history = [json.loads((tmp_path / name / "history.json").read_text())["iterations"] for name in "ab"]
    assert history[0] == history[1] and first.status == "finished"


def test_a_run_needing_views_or_layers_the_cache_lacks_is_refused_before_training(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=10)
    with pytest.raises(FishsegError, match=r"`augment='views'`: .*toy.h5 holds no views but the photo as it "
                                           r"is; extract it again with views, e\.g\. `views=\("):
        run_training(cache, tmp_path / "run", TrainConfig(augment="views"), device="cpu")
    with pytest.raises(FishsegError, match=r"layers 2: the backbone has 1 block \(1 … 1"):
        run_training(cache, tmp_path / "run", TrainConfig(layers=(2,)), device="cpu")
    assert not (tmp_path / "run").exists()


def test_a_decoder_that_uses_the_image_trains_on_cached_previews_without_decoding_an_image(
        toy_run: tuple[Path, Path, RunRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("training decoded an image")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    seen: list[torch.Tensor | None] = []
    real_step = train_module.decoder_step
    monkeypatch.setattr(train_module, "decoder_step",
                        lambda *args, **kwargs: seen.append(kwargs["guides"]) or real_step(*args, **kwargs))
    config = dataclasses.replace(TOY, decoder="guided", epochs=2, augment="flips")
    in_memory = run_training(toy_run[0], tmp_path / "memory", config, device="cpu", stream=False)
    assert all(guides is not None and guides.dtype == torch.uint8 and guides.shape[1:] == (8, 8, 3)
               for guides in seen)  # every batch, train and val, carries its previews
    run_training(toy_run[0], tmp_path / "streamed", config, device="cpu", stream=True)
    histories = [json.loads((tmp_path / name / "history.json").read_text())["iterations"]
                 for name in ("memory", "streamed")]
    assert histories[0] == histories[1] and in_memory.epochs_done == 2


def test_previews_are_held_only_for_a_decoder_that_uses_the_image(toy_run: tuple[Path, Path, RunRecord],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with FeatureCache(toy_run[0]) as cache:
        needed = cache.bytes_per_image() * len(cache)
        monkeypatch.setattr(train_module, "available_memory", lambda: 2 * needed + 2)
        assert TrainingData.open(cache, None).previews is None
        assert TrainingData.open(cache, None, guides=True).streamed  # the 8×8×3 previews tip it over
        data = TrainingData.open(cache, False, guides=True)
        assert data.previews is not None and data.previews.shape == (len(cache), 8, 8, 3)
        assert next(data.split(np.arange(4)).batches([torch.arange(2)]))[2] is None
        with pytest.raises(AssertionError, match="guides=True"):
            TrainingData.open(cache, False).split(np.arange(4), guides=True)


def test_a_guide_is_seen_in_the_same_view_as_its_features(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12, views=("hflip", "rot90"))
    with FeatureCache(cache) as opened:
        positions, view_ids = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0] + [0] * 9)
        previews = torch.from_numpy(opened.previews([0, 1, 2]))
        for stream in (False, True):
            split = TrainingData.open(opened, stream, guides=True).split(np.arange(12), guides=True)
            (_, masks, guides), = split.batches([positions], view_ids)
            torch.testing.assert_close(guides[0], apply_view(previews[:1], "hflip", (1, 2))[0])
            torch.testing.assert_close(guides[1], apply_view(previews[1:2], "rot90", (1, 2))[0])
            torch.testing.assert_close(guides[2], previews[2])
            torch.testing.assert_close(masks[1], torch.from_numpy(opened.masks([1], "rot90")[0]))
    config = TrainConfig(decoder="guided", epochs=2, batch_size=4, seed=1, augment="views")
    run_training(cache, tmp_path / "a", config, device="cpu")
    run_training(cache, tmp_path / "b", config, device="cpu", stream=True)
    history = [json.loads((tmp_path / name / "history.json").read_text())["iterations"] for name in "ab"]
    assert history[0] == history[1]


def test_compile_runs_the_decoder_through_torch_compile_and_is_recorded(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag's plumbing (torch.compile itself is replaced: its first compile takes minutes on this CPU)."""
    from click.testing import CliRunner

    from fishseg.cli import main

    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=10)
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1",
                                       "--device", "cpu", "--compile"])
    assert result.exit_code == 0, result.output
    assert len(compiled) == 1 and RunFolder(tmp_path / "run").read_record().compiled
    assert not run_training(cache, tmp_path / "plain", TrainConfig(epochs=1), device="cpu").compiled


@pytest.mark.slow
def test_a_compiled_decoder_trains_like_the_eager_one(tmp_path: Path) -> None:
    """torch.compile for real (its first compile takes tens of seconds on the 2-core CPU)."""
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=10)
    config = TrainConfig(decoder="linear", epochs=2, batch_size=4)
    compiled = run_training(cache, tmp_path / "compiled", config, device="cpu", compiled=True)
    eager = run_training(cache, tmp_path / "eager", config, device="cpu")
    assert compiled.compiled and compiled.best_val_iou == pytest.approx(eager.best_val_iou, abs=1e-4)
