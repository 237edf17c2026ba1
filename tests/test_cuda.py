"""Each stage on the CPU and on CUDA in one process, compared: the GPU path gives the CPU's answers.

Skipped without CUDA. ``FISHSEG_TEST_DEVICE=cpu`` runs it against the CPU instead (a dry run: every
comparison holds trivially, but every line executes), which is how a machine without a GPU exercises it.
``scripts/gpu-check`` runs it on a lent GPU. Tolerances are module constants, quoted by README and docs/gpu.md.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fishseg.config import TrainConfig
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import RunFolder
from fishseg.inference.predict import run_prediction
from fishseg.models.backbone import load_backbone
from fishseg.models.decoders import DECODERS, build_decoder, uses_image
from fishseg.training.sweep import run_sweep
from fishseg.training.train import decoder_step, run_training
from tests.helpers import interrupt_at_pass, tiny_extract_config, write_toy_cache

DEVICE = os.environ.get("FISHSEG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device (set FISHSEG_TEST_DEVICE=cpu for a dry run on the CPU)")

FEATURE_COSINE = 0.995  # per patch token, backbone forward CPU vs CUDA (bf16/fp16 autocast on CUDA)
GRADIENT_COSINE = 0.99  # one decoder step, all parameters' gradients flattened
TRAINING_IOU = 0.03  # final val IoU after 3 toy epochs, and a 2-config sweep's mean IoUs
EXTRACTED_COSINE = 0.999  # per patch token of the extracted cache, every view
PREDICTED_PIXELS = 0.995  # share of predicted mask pixels that agree
RESUME_IOU = 0.01  # on CUDA without --deterministic: a resumed run's final val IoU against the uninterrupted one
RECIPE = TrainConfig(epochs=3, batch_size=4, seed=3)
SIDES = (("cpu", "cpu"), ("device", DEVICE))  # (output folder, device): distinct folders in a CPU dry run too


def _cosines(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of the last axis (per token, or per flattened vector)."""
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


def _final_val_iou(run_dir: Path) -> float:
    return RunFolder(run_dir).read_history(RunFolder(run_dir).read_record())["epochs"][-1]["val_iou"]


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_cache(tmp_path_factory.mktemp("cuda-toy") / "toy.h5", n_images=30)


def test_backbone_features_match_per_token(tiny_backbone: Path) -> None:
    config = tiny_extract_config(tiny_backbone)
    images = torch.randint(0, 256, (4, 3, config.image_size, config.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    features = [load_backbone(str(tiny_backbone), config.mean, config.std, torch.device(name))(images)
                for name in ("cpu", DEVICE)]
    assert features[1].shape == features[0].shape
    assert _cosines(features[0], features[1]).min() >= FEATURE_COSINE


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_one_decoder_step_has_the_same_gradients(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 8, 8, 16, generator=generator).half()
    masks = (torch.rand(4, 32, 32, generator=generator) > 0.5).to(torch.uint8)
    guides = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=generator)
    gradients = []
    for device in (torch.device("cpu"), torch.device(DEVICE)):
        torch.manual_seed(0)
        decoder = build_decoder(name, 16).to(device).train()
        optimizer = torch.optim.SGD(decoder.parameters(), lr=0.0)  # a step that keeps the weights and the gradients
        decoder_step(decoder, features, masks, device, optimizer, guides=guides if uses_image(decoder) else None)
        gradients.append(torch.cat([p.grad.flatten().double().cpu() for p in decoder.parameters()]))
    assert _cosines(gradients[0][None], gradients[1][None]).item() >= GRADIENT_COSINE


def test_three_toy_epochs_reach_the_same_val_iou(toy_cache: Path, tmp_path: Path) -> None:
    for folder, device in SIDES:
        run_training(toy_cache, tmp_path / folder, RECIPE, device=device)
    assert abs(_final_val_iou(tmp_path / "cpu") - _final_val_iou(tmp_path / "device")) <= TRAINING_IOU


def test_extraction_with_workers_and_a_view_matches(kaggle_root: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(tiny_extract_config(tiny_backbone), views=("hflip",))
    paths = [run_extraction(kaggle_root, tmp_path / f"{folder}.h5", config, num_workers=2, device=device)
             for folder, device in SIDES]
    with FeatureCache(paths[0]) as cpu, FeatureCache(paths[1]) as other:
        assert cpu.image_ids == other.image_ids
        everything = range(len(cpu))
        np.testing.assert_array_equal(cpu.masks(everything), other.masks(everything))
        np.testing.assert_array_equal(cpu.previews(everything), other.previews(everything))
        np.testing.assert_array_equal(cpu.groups, other.groups)
        for view in ("identity", "hflip"):
            assert _cosines(cpu.features(everything, view), other.features(everything, view)).min() >= EXTRACTED_COSINE


def test_predicted_masks_agree(tiny_run: Path, kaggle_root: Path, tmp_path: Path) -> None:
    photos = sorted(path for path in kaggle_root.rglob("*.png") if " GT" not in str(path))[:4]
    for folder, device in SIDES:
        run_prediction(tiny_run, photos, tmp_path / folder, num_workers=0, device=device)
    masks = sorted((tmp_path / "cpu" / "masks").glob("*.png"))
    assert len(masks) == len(photos)
    agree = [np.mean(np.asarray(Image.open(path)) == np.asarray(Image.open(tmp_path / "device" / "masks" / path.name)))
             for path in masks]
    assert min(agree) >= PREDICTED_PIXELS


def test_resume_on_the_device_matches_the_uninterrupted_run(toy_cache: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = TrainConfig(epochs=5, batch_size=4, seed=3)
    run_training(toy_cache, tmp_path / "uninterrupted", recipe, device=DEVICE)
    interrupt_at_pass(monkeypatch, 5)  # epoch 3's training
    with pytest.raises(KeyboardInterrupt):
        run_training(toy_cache, tmp_path / "resumed", recipe, device=DEVICE)
    monkeypatch.undo()
    record = run_training(toy_cache, tmp_path / "resumed", recipe, device=DEVICE, resume=True)
    assert record.status == "finished" and record.epochs_done == 5
    assert abs(_final_val_iou(tmp_path / "resumed") - _final_val_iou(tmp_path / "uninterrupted")) <= RESUME_IOU


def test_a_two_config_sweep_matches(toy_cache: Path, tmp_path: Path) -> None:
    grid = {"decoder": ("seed-cnn", "linear"), "epochs": (2,), "batch_size": (4,)}
    boards = []
    for folder, device in SIDES:
        run_sweep(toy_cache, tmp_path / folder, grid, device=device)
        with (tmp_path / folder / "leaderboard.csv").open(encoding="utf-8") as handle:
            boards.append({row["name"]: float(row["mean_iou"]) for row in csv.DictReader(handle)})
    assert len(boards[0]) == 2 and boards[0].keys() == boards[1].keys()
    assert all(abs(boards[0][config] - boards[1][config]) <= TRAINING_IOU for config in boards[0])
