from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fishseg.cli import main
from fishseg.evaluation.probe import pooled_features, run_probe
from fishseg.formats.cache import FeatureCache
from tests.helpers import write_toy_cache


def test_pooled_features_are_grid_means(tmp_path: Path) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "toy.h5", n_images=6)) as cache:
        indices = np.array([4, 0, 2])
        expected = cache.features(indices).astype(np.float32).mean(axis=(1, 2))
        np.testing.assert_allclose(pooled_features(cache, indices), expected, rtol=1e-6)


def test_probe_confusion_matrix_counts_every_validation_image_by_its_true_species(tmp_path: Path) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "toy.h5", n_images=40)) as cache:
        labels = cache.class_index  # class0 / class1 alternate; the toy features do not encode them
        result = run_probe(cache, np.arange(0, 30), np.arange(30, 40))
        assert result["n_train"] == 30 and result["n_val"] == 10
        confusion = np.array(result["confusion"])
        assert confusion.shape == (2, 2) and confusion.sum() == 10
        assert result["accuracy"] == pytest.approx(np.trace(confusion) / 10)
        assert (confusion.sum(axis=1) == np.bincount(labels[30:40], minlength=2)).all()


def test_probe_with_one_species_says_it_is_skipped(tmp_path: Path) -> None:
    with FeatureCache(write_toy_cache(tmp_path / "toy.h5", n_images=8)) as cache:
        assert run_probe(cache, np.array([0, 2, 4]), np.array([1]))["skipped"].startswith("fewer than two species")


def test_probe_command_prints_accuracy_and_matrix(tmp_path: Path, tiny_cache: Path) -> None:
    out = tmp_path / "probe.json"
    result = CliRunner().invoke(main, ["probe", "--cache", str(tiny_cache), "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert f"species accuracy {saved['accuracy']:.4f}" in result.output
    assert "Black Sea Sprat" in result.output and "Hourse Mackerel" in result.output
