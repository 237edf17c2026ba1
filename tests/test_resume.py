"""Fault injection: SIGKILL an extraction at seeded random points, resume, and compare with an uninterrupted run."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fishseg.data.synthetic import write_demo_dataset
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache
from tests.helpers import REPO, SMALL_PHOTO, tiny_extract_config

KILLS = 4


def _command(data: Path, out: Path, backbone: Path) -> list[str]:
    return [sys.executable, str(REPO / "extract_features.py"), "--data-root", str(data), "--out", str(out),
            "--backbone", str(backbone), "--image-size", "64", "--preview-size", "32", "--views", "hflip",
            "--batch-size", "1",
            "--num-workers", "0", "--device", "cpu"]


def _kill_after(command: list[str], parts: Path, finished_batches: int) -> bool:
    """Start an extraction and SIGKILL it once ``finished_batches`` parts exist; False if it ended first."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if len(list(parts.glob("*.npz"))) >= finished_batches:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    return False


def test_killed_extraction_resumes_to_the_uninterrupted_cache(tmp_path: Path, tiny_backbone: Path) -> None:
    data = write_demo_dataset(tmp_path / "data", classes=2, images_per_class=20, size=SMALL_PHOTO, seed=5)
    config = dataclasses.replace(tiny_extract_config(tiny_backbone), views=("hflip",))
    reference = run_extraction(data, tmp_path / "reference.h5", config, batch_size=1, num_workers=0, device="cpu")
    out, parts = tmp_path / "resumed.h5", tmp_path / "resumed.h5.parts"
    command = _command(data, out, tiny_backbone)
    targets = np.sort(np.random.default_rng(0).choice(np.arange(1, 41), KILLS, replace=False))
    killed = [_kill_after(command, parts, int(target)) for target in targets]
    assert sum(killed) >= 2, killed  # on a loaded machine a run may finish before a late kill lands
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    assert not parts.exists()
    with FeatureCache(out) as resumed, FeatureCache(reference) as expected:
        assert resumed.fingerprint == expected.fingerprint and resumed.image_ids == expected.image_ids
        everything = range(len(expected))
        for view in ("identity", "hflip"):
            np.testing.assert_array_equal(resumed.features(everything, view), expected.features(everything, view))
        np.testing.assert_array_equal(resumed.masks(everything), expected.masks(everything))
        np.testing.assert_array_equal(resumed.previews(everything), expected.previews(everything))


def _interrupt_after(command: list[str], parts: Path, finished_batches: int,
                     stop: signal.Signals = signal.SIGINT) -> tuple[int, str]:
    """Start an extraction, send ``stop`` once ``finished_batches`` parts exist; (exit status, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and len(list(parts.glob("*.npz"))) < finished_batches:
        time.sleep(0.002)
    process.send_signal(stop)
    return process.wait(timeout=60), process.communicate()[1]


@pytest.mark.parametrize("stop, exit_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_cleanly_with_a_resume_message(tmp_path: Path, tiny_backbone: Path,
                                                                stop: signal.Signals, exit_status: int) -> None:
    data = write_demo_dataset(tmp_path / "data", classes=2, images_per_class=10, size=SMALL_PHOTO, seed=5)
    for attempt in range(5):  # on a loaded machine a run can finish before the signal lands: try afresh
        out = tmp_path / f"c{attempt}.h5"
        status, stderr = _interrupt_after(_command(data, out, tiny_backbone), out.with_name(out.name + ".parts"), 3,
                                          stop)
        if status != 0:
            break
    assert status == exit_status, stderr
    assert "Interrupted. Finished batches are kept: run the same command again to resume." in stderr
    assert "Traceback" not in stderr and not out.exists() and list(out.with_name(out.name + ".parts").glob("*.npz"))
