"""End to end on the real underwater photos in ../shared/data/f4k-sample (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fishseg.config import TrainConfig
from fishseg.data.images import discover_samples
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache
from fishseg.training.train import run_training
from tests.helpers import F4K_SAMPLE, tiny_extract_config

pytestmark = pytest.mark.skipif(not F4K_SAMPLE.is_dir(), reason=f"{F4K_SAMPLE} not present")


def test_f4k_sample_end_to_end(tmp_path: Path, tiny_backbone: Path) -> None:
    samples = discover_samples(F4K_SAMPLE)
    assert len(samples) == 54 and {s.class_name for s in samples} == {"fish"}
    cache = run_extraction(F4K_SAMPLE, tmp_path / "f4k.h5", tiny_extract_config(tiny_backbone), num_workers=0,
                           device="cpu")
    with FeatureCache(cache) as opened:
        assert len(opened) == 54 and opened.features([0]).shape == (1, 8, 8, 32)
        assert 0 < opened.masks(range(54)).mean() < 1  # real masks: some fish, some background
    run_training(cache, tmp_path / "run", TrainConfig(epochs=3), device="cpu")
    metrics = run_evaluation(cache, tmp_path / "run", tmp_path / "report", device="cpu")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert metrics["n_images"] == 11 and metrics["mean_iou"] == pytest.approx(run["best_val_iou"], abs=1e-6)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == metrics
