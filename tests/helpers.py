"""Test helpers that are not fixtures: tiny configs and a learnable toy cache."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fishseg.training.train as train_module
from fishseg.config import BackboneInfo, ExtractConfig
from fishseg.data.images import Sample, apply_view
from fishseg.formats.cache import CacheWriter
from fishseg.inference.predict import PredictionResult, run_prediction
from fishseg.inference.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]
F4K_SAMPLE = REPO.parent / "shared" / "data" / "f4k-sample"
TINY_LAYOUT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   patch_size=8, num_register_tokens=4)
TINY_IMAGE_SIZE = 64  # → 8×8 grid with patch 8
SMALL_PHOTO = (118, 89)  # a fifth of the Kaggle photo size


def tiny_extract_config(backbone: Path) -> ExtractConfig:
    return ExtractConfig(backbone=str(backbone), image_size=TINY_IMAGE_SIZE, preview_size=32)


def write_toy_cache(path: Path, n_images: int = 24, *, seed: int = 0, image_size: int = 32, grid: int = 8,
                    dim: int = 16, views: tuple[str, ...] = (), classes: tuple[str, ...] = (),
                    mask_format: str = "index") -> Path:
    """A learnable cache: feature channel 0 is the mask at grid resolution plus noise, the rest noise; each of
    ``views`` holds the grids seen in that view. With ``classes`` (names, the background first) the masks hold
    class indices: image i a rectangle of class 1 + i mod (C - 1) and a smaller one of the next class, and
    feature channel k the mask of class k at grid resolution; ``mask_format`` is what the cache records."""
    rng = np.random.default_rng(seed)
    config = ExtractConfig(backbone="toy", image_size=image_size, preview_size=8, views=views,
                           mask_format=mask_format if classes else "binary", classes=classes)
    info = BackboneInfo("toy", "toy", image_size // grid, dim, 0, True)
    samples = [Sample(f"class{i % 2}/{i:03d}.png", Path("unused"), Path("unused"), f"class{i % 2}")
               for i in range(n_images)]
    masks = np.zeros((n_images, image_size, image_size), np.uint8)
    for i in range(n_images):
        top, left = rng.integers(0, image_size // 2, size=2)
        height, width = rng.integers(image_size // 4, image_size // 2, size=2)
        masks[i, top:top + height, left:left + width] = 1 + i % (len(classes) - 1) if classes else 1
        if classes:
            row, col = rng.integers(0, image_size - image_size // 4, size=2)
            masks[i, row:row + image_size // 4, col:col + image_size // 4] = 1 + (i + 1) % (len(classes) - 1)
    features = rng.normal(0, 0.3, (n_images, grid, grid, dim))
    for k in range(1, max(len(classes), 2)):
        coarse = (masks == k).reshape(n_images, grid, image_size // grid, grid, image_size // grid).mean((2, 4))
        features[..., k - 1] += 2 * coarse - 1
    previews = rng.integers(0, 255, (n_images, 8, 8, 3), dtype=np.uint8)
    features = features.astype(np.float16)
    seen = {view: apply_view(torch.from_numpy(features), view, (1, 2)).numpy() for view in views}
    with CacheWriter(path, config, info, samples) as writer:
        writer.write(0, features, masks, previews, seen)
    return path


def move_a_training_image_to_val(run_dir: Path) -> dict[str, list[str]]:
    """Edit the run's split.json as a user might (scored, the moved image would inflate the val IoU); returns the
    split as it was."""
    split = json.loads((run_dir / "split.json").read_text())
    edited = {"train": split["train"][1:], "val": [split["train"][0], *split["val"]]}
    (run_dir / "split.json").write_text(json.dumps(edited))
    return split


def interrupt_at_pass(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """Make training raise KeyboardInterrupt (Ctrl-C) at the start of its ``number``-th pass over a split
    (2 passes an epoch: train, then val), as if the user stopped it there. A sweep's time estimate runs the real
    passes: fishseg.training.sweep is imported first, so its own name for run_epoch stays unpatched."""
    importlib.import_module("fishseg.training.sweep")
    real_epoch, calls = train_module.run_epoch, []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", interrupted)


def demo_photos(root: Path, count: int) -> list[Path]:
    """The first ``count`` photos (not their masks) of a generated Kaggle-layout dataset under ``root``."""
    return sorted(path for path in root.rglob("*.png") if " GT" not in str(path))[:count]


PAIRED_BATCH = 2  # predict's and the Segmenter's, so that both see the photos in the same batches


def paired_segmenter(run: Path) -> Segmenter:
    """The run's Segmenter, batched as ``paired_prediction`` is (their outputs can be compared exactly)."""
    return Segmenter.from_run(run, device="cpu", batch_size=PAIRED_BATCH)


def paired_prediction(run: Path, photos: list[Path], out: Path) -> PredictionResult:
    """``predict`` of ``photos`` into ``out``, batched as ``paired_segmenter``."""
    return run_prediction(run, photos, out, batch_size=PAIRED_BATCH, num_workers=0, device="cpu")
