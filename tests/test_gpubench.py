"""The GPU measures' structure and arithmetic, as a CPU dry run on tiny sizes; no number is checked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fishseg.bench.gpubench as gpubench
from fishseg.bench.gpubench import (RESULTS_FILE, TINY_GPU_BENCH, GpuBenchConfig, compile_gain, format_gpu_table,
                                    generate_cache, main, require_cuda, sweep_epochs)
from fishseg.config import IDENTITY
from fishseg.errors import FishsegError
from fishseg.training.train import InMemorySplit


def test_the_dry_run_reports_every_measure(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--device", "cpu"])
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert set(results["forward_images_per_s"]) == {"2", "4"}
    assert results["extraction_images_per_s"] > 0 and results["cached_epoch_s"] > 0
    assert results["host_syncs_per_step"] is None  # counted on CUDA only
    assert (results["sweep"]["configs"], results["sweep"]["epochs_per_config"]) == (12, 1)
    assert results["evaluate"]["images"] == 4  # a fifth of the 20 generated images
    assert "G4 sweep 12 configs × 1 epochs" in format_gpu_table(results)
    assert not list(tmp_path.glob("*.h5"))  # the scratch cache stays out of --out


def test_the_generated_cache_has_the_asked_shapes() -> None:
    config = dataclasses.replace(TINY_GPU_BENCH, cache_images=12, grid=6, feature_dim=8, mask_size=24)
    features, masks = generate_cache(config, torch.device("cpu"))
    assert features.shape == (12, 6, 6, 8) and features.dtype == torch.float16
    assert masks.shape == (12, 24, 24) and masks.dtype == torch.uint8 and set(masks.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize(("epoch_s", "expected"), [(0.1, 20), (1.0, 10), (100.0, 1)])
def test_the_sweep_is_cut_to_its_budget(epoch_s: float, expected: int) -> None:
    assert sweep_epochs(GpuBenchConfig(sweep_budget_s=150.0), epoch_s) == expected


def test_cuda_asked_without_it_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FishsegError, match="no CUDA device here .* nothing was measured"):
        require_cuda("cuda")
    require_cuda("cpu")


def test_sizes_are_checked() -> None:
    with pytest.raises(FishsegError, match="cache_images"):
        GpuBenchConfig(cache_images=0)
    with pytest.raises(FishsegError, match="forward_batches"):
        GpuBenchConfig(forward_batches=())


def test_compile_gain_charges_the_compile_to_the_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    seconds = iter([3.0, 0.5])
    monkeypatch.setattr(gpubench, "timed", lambda function, device: (function(), next(seconds))[1])
    config = dataclasses.replace(TINY_GPU_BENCH, sweep_epochs=20)
    features, masks = generate_cache(config, torch.device("cpu"))
    split = InMemorySplit({IDENTITY: features}, masks, np.arange(len(features)))
    gain = compile_gain(split, config, torch.device("cpu"), plain_epoch_s=0.6)
    assert len(compiled) == 1
    assert gain == {"first_epoch_s": 3.0, "epoch_s": 0.5, "epochs": 20, "run_s": 3.0 + 19 * 0.5, "plain_run_s": 12.0}
