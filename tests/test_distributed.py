"""torchrun with the gloo backend on CPU: the result must equal a single-process run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fishseg.cache import FeatureCache
from fishseg.demo import write_demo_dataset
from fishseg.distributed import Ranks
from fishseg.extract import run_extraction
from tests.helpers import REPO, SMALL_PHOTO, tiny_extract_config

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def test_shards_are_contiguous_and_cover_everything_once() -> None:
    items = list(range(10))
    shards = [Ranks(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert Ranks().shard(items) == items and Ranks().main and not Ranks(1, 2).main


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_torchrun_extraction_equals_a_single_process_cache(tmp_path: Path, tiny_backbone: Path) -> None:
    data = write_demo_dataset(tmp_path / "data", classes=2, images_per_class=5, size=SMALL_PHOTO, seed=3)
    single = run_extraction(data, tmp_path / "single.h5", tiny_extract_config(tiny_backbone), batch_size=2,
                            num_workers=0, device="cpu")
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(REPO / "extract_features.py"),
               "--data-root", str(data), "--out", str(tmp_path / "two.h5"), "--backbone", str(tiny_backbone),
               "--image-size", "64", "--preview-size", "32", "--batch-size", "2", "--num-workers", "0",
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stderr and not (tmp_path / "two.h5.parts").exists()
    with FeatureCache(tmp_path / "two.h5") as two, FeatureCache(single) as one:
        assert two.fingerprint == one.fingerprint and two.image_ids == one.image_ids
        everything = range(len(one))
        np.testing.assert_array_equal(two.features(everything), one.features(everything))
        np.testing.assert_array_equal(two.masks(everything), one.masks(everything))
        np.testing.assert_array_equal(two.groups, one.groups)
