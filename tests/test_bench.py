"""The benchmark's structure and arithmetic on a tiny config; its numbers belong in README, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import fishseg.bench as bench_module
from fishseg.bench import BenchConfig, format_table, run_benchmark
from fishseg.cli import main


@pytest.fixture(scope="module")
def results(tiny_backbone: Path) -> dict:
    config = BenchConfig(images=4, image_size=32, batch_size=2, backbone=str(tiny_backbone), scale=2, device="cpu",
                         num_workers=0, processes=(1, 2))
    return run_benchmark(config)


def test_every_measure_is_reported_with_its_ratio(results: dict) -> None:
    assert results["environment"]["images"] == 4 and results["environment"]["random_init"]
    for key in ("forward_images_per_s", "extraction_images_per_s", "reference_epoch_s", "cached_epoch_s"):
        assert results[key] > 0
    assert results["extraction_vs_forward"] == pytest.approx(
        results["extraction_images_per_s"] / results["forward_images_per_s"])
    assert results["cached_speedup"] == pytest.approx(results["reference_epoch_s"] / results["cached_epoch_s"])


def test_memory_is_measured_for_both_modes_at_two_cache_sizes(results: dict) -> None:
    assert [(row["features"], row["images"]) for row in results["memory"]] == [
        ("in memory", 4), ("streamed", 4), ("in memory", 8), ("streamed", 8)]
    assert all(row["epoch_seconds"] > 0 and row["peak_rss_growth_mb"] >= 0 for row in results["memory"])


def test_storage_options_hold_the_same_features(results: dict) -> None:
    rows = {row["compression"]: row for row in results["storage"]}
    assert set(rows) == {"none", "lzf", "gzip"}
    assert all(row["file_mb"] > 0 and row["read_mb_per_s"] > 0 for row in rows.values())


def test_torchrun_scaling_times_both_commands_for_each_process_count(results: dict) -> None:
    rows = results["scaling"]
    assert [row["processes"] for row in rows] == [1, 2]
    for row in rows:
        assert row["extraction_s"] > 0 and row["epoch_s"] > 0 and row["training_s"] > row["epoch_s"]
        assert row["extraction_images_per_s"] == pytest.approx(4 / row["extraction_s"])
        assert row["epoch_images_per_s_ratio"] == pytest.approx(row["epoch_images_per_s"] / rows[0]["epoch_images_per_s"])
    assert rows[0]["extraction_images_per_s_ratio"] == 1.0


def test_table_names_each_measure_and_target(results: dict) -> None:
    table = format_table(results)
    for text in ("1 backbone forward", "2 extraction end to end", "(target ≥ 0.9)", "cached epoch", "(target ≥ 25)",
                 "streamed / in-memory epoch time at 8 images", "5 cache storage", "gzip", "6 torchrun"):
        assert text in table
    assert "not run (pass --processes" in format_table({**results, "scaling": []})


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
