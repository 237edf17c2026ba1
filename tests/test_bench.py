"""The benchmark's structure and arithmetic on a tiny config; its numbers belong in README, not here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fishseg.bench.bench as bench_module
from fishseg.bench.bench import BenchConfig, format_table, run_benchmark
from fishseg.cli import main
from fishseg.formats.cache import FeatureCache

TINY = BenchConfig(images=4, image_size=32, batch_size=2, scale=2, device="cpu", num_workers=0, sweep_epochs=2)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def results(tiny_backbone: Path, bench_dir: Path) -> dict:
    """Every measure but torchrun scaling (its process start-ups are the expensive part: see the slow test)."""
    return run_benchmark(dataclasses.replace(TINY, backbone=str(tiny_backbone)), bench_dir)


def test_every_measure_is_reported(results: dict) -> None:
    assert results["environment"]["images"] == 4 and results["environment"]["random_init"]
    for key in ("forward_images_per_s", "extraction_images_per_s", "reference_epoch_s", "cached_epoch_s",
                "extraction_vs_forward", "cached_speedup"):
        assert results[key] > 0
    assert results["scaling"] == []


def test_an_epoch_with_ten_classes_is_measured_beside_the_binary_one(results: dict) -> None:
    assert results["cached_epoch_classes_s"] > 0
    assert results["classes_vs_binary_epoch"] == pytest.approx(results["cached_epoch_classes_s"]
                                                                / results["cached_epoch_s"])
    assert "cached epoch, 10 pixel classes" in format_table(results)


def test_memory_is_measured_for_both_modes_at_two_cache_sizes(results: dict) -> None:
    assert [(row["features"], row["images"]) for row in results["memory"]] == [
        ("in memory", 4), ("streamed", 4), ("in memory", 8), ("streamed", 8)]
    assert all(row["epoch_seconds"] > 0 and row["peak_rss_growth_mb"] >= 0 for row in results["memory"])


def test_storage_options_hold_the_same_features(results: dict, bench_dir: Path) -> None:
    rows = {row["compression"]: row for row in results["storage"]}
    assert set(rows) == {"none", "lzf", "gzip"}
    assert all(row["file_mb"] > 0 and row["read_mb_per_s"] > 0 for row in rows.values())
    with FeatureCache(bench_dir / "cache.h5") as cache:
        expected = cache.features(range(len(cache)))
    for compression in rows:
        with FeatureCache(bench_dir / f"storage-{compression}.h5") as copy:
            np.testing.assert_array_equal(copy.features(range(len(copy))), expected)
            assert copy.file["features"].compression == (None if compression == "none" else compression)


def test_sweep_overhead_is_measured_on_eight_configs(results: dict, bench_dir: Path) -> None:
    sweep = results["sweep"]
    assert (sweep["configs"], sweep["epochs_per_config"]) == (8, 2)
    assert 0 < sweep["inside_epochs_s"] < sweep["wall_s"] - sweep["torch_startup_s"]
    assert len((bench_dir / "sweep" / "leaderboard.csv").read_text().splitlines()) == 1 + 8
    histories = [json.loads(path.read_text()) for path in (bench_dir / "sweep").glob("*/history.json")]
    assert len(histories) == 8 and all(len(history["epochs"]) == 2 for history in histories)


@pytest.mark.slow
def test_torchrun_scaling_times_both_commands_for_each_process_count(tiny_backbone: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, backbone=str(tiny_backbone), processes=(1, 2))
    rows = run_benchmark(config, tmp_path)["scaling"]
    assert [row["processes"] for row in rows] == [1, 2]
    for row in rows:
        assert row["extraction_s"] > 0 and row["epoch_s"] > 0 and row["training_s"] > row["epoch_s"]
    assert rows[0]["extraction_images_per_s_ratio"] == 1.0
    for processes in (1, 2):
        run = json.loads((tmp_path / f"scaling-{processes}" / "run.json").read_text())
        assert (run["processes"], run["status"]) == (processes, "finished")
        with FeatureCache(tmp_path / f"scaling-{processes}.h5") as cache:
            assert len(cache) == 4


def test_evaluate_is_timed_scores_alone_and_with_the_report(results: dict, bench_dir: Path) -> None:
    evaluation = results["evaluate"]
    assert evaluation["images"] >= 1 and 0 < evaluation["scores_s"] and 0 < evaluation["with_report_s"]
    assert (bench_dir / "scores" / "metrics.json").exists() and not (bench_dir / "scores" / "report.html").exists()
    assert (bench_dir / "report" / "report.html").exists()
    assert results["gpu"] is None  # the GPU measures run only on CUDA


def test_asking_for_cuda_without_it_stops_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_module, "write_demo_dataset", lambda *args, **kwargs: pytest.fail("measured"))
    result = CliRunner().invoke(main, ["bench", "--images", "4", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device here" in result.output and "nothing was measured" in result.output


def test_table_names_each_measure_and_target(results: dict) -> None:
    table = format_table(results)
    for text in ("1 backbone forward", "2 extraction end to end", "(target ≥ 0.9)", "cached epoch", "(target ≥ 25)",
                 "streamed / in-memory epoch time at 8 images", "5 cache storage", "gzip",
                 "6 torchrun scaling: not run (pass --processes", "7 sweep of 8 configs × 2 epochs",
                 "of the rest inside epochs (target ≥ 90%)", "8 evaluate on", "with the report"):
        assert text in table


def test_bench_command_prints_the_table_and_writes_json(tmp_path: Path, results: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_module, "run_benchmark", lambda config: results)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--images", "4", "--processes", "1,2", "--device", "cpu",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert format_table(results) in result.output
    saved = json.loads(out.read_text())
    assert saved["config"]["images"] == 4 and saved["config"]["processes"] == [1, 2]
    assert saved["memory"] == results["memory"]


@pytest.mark.parametrize("processes", ["two", "1,0"])
def test_bad_process_counts_are_refused(processes: str) -> None:
    result = CliRunner().invoke(main, ["bench", "--processes", processes])
    assert result.exit_code == 2 and "--processes" in result.output
