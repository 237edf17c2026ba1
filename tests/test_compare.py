"""`fishseg compare`: which runs can be compared, where their scores come from, and verdicts with known answers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.evaluation.compare import run_compare
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.formats.runs import RunFolder
from fishseg.training.crossval import run_cross_validation
from fishseg.training.train import run_training
from tests.helpers import interrupt_at_pass, write_toy_cache

QUICK = TrainConfig(epochs=2, batch_size=8, lr=3e-3, val_fraction=0.4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy cache of 100 images (40 validated), two decoders on one split, one run of another split and one
    run of another cache."""
    root = tmp_path_factory.mktemp("compare")
    cache = write_toy_cache(root / "toy.h5", n_images=100)
    other_cache = write_toy_cache(root / "other.h5", n_images=90, seed=7)  # other images: another fingerprint
    folders = {"cache": cache, "seed-cnn": root / "seed-cnn", "linear": root / "linear",
               "other-split": root / "other-split", "other-cache": root / "other-cache"}
    run_training(cache, folders["seed-cnn"], QUICK, device="cpu")
    run_training(cache, folders["linear"], TrainConfig(**{**QUICK.__dict__, "decoder": "linear"}), device="cpu")
    run_training(cache, folders["other-split"], TrainConfig(**{**QUICK.__dict__, "seed": 5}), device="cpu")
    run_training(other_cache, folders["other-cache"], QUICK, device="cpu")
    run_evaluation(cache, folders["seed-cnn"], device="cpu", report=False)
    return folders


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "leaderboard.csv").open(newline="", encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def _invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["compare", *map(str, args)])
    return result.exit_code, result.output


def test_a_run_against_its_copy_shows_no_difference(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(runs["seed-cnn"], tmp_path / "copy"))
    board = run_compare([runs["seed-cnn"], copy], tmp_path / "out", device="cpu")
    comparison = next(entry.comparison for entry in board.entries if entry.comparison is not None)
    assert (comparison.mean_difference, comparison.ci_low, comparison.ci_high) == (0, 0, 0)
    assert comparison.p_value == 1.0 and comparison.verdict == "no detectable difference (n=40)"


def _plant_shift(run_dir: Path, shift: float) -> None:
    """Move every per-image IoU of the run's saved evaluation by ``shift`` (clipped to [0, 1])."""
    path = run_dir / "report" / "per_image.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["iou"] = f"{min(1.0, max(0.0, float(row['iou']) + shift)):.6f}"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("shift, verdict", [(-0.05, "worse"), (0.05, "better")])
def test_a_planted_per_image_shift_is_found(runs: dict[str, Path], tmp_path: Path, shift: float, verdict: str) -> None:
    shifted = Path(shutil.copytree(runs["seed-cnn"], tmp_path / "shifted"))
    _plant_shift(shifted, shift)
    board = run_compare([shifted], tmp_path / "out", baseline=runs["seed-cnn"], device="cpu")
    comparison = {entry.name: entry.comparison for entry in board.entries}["shifted"]
    assert comparison.verdict == verdict
    assert comparison.ci_low <= comparison.mean_difference <= comparison.ci_high
    assert (comparison.ci_low > 0) if shift > 0 else (comparison.ci_high < 0)
    assert abs(comparison.mean_difference) == pytest.approx(0.05, abs=0.02)  # clipping at 0 and 1 takes a little
    assert _rows(tmp_path / "out")["seed-cnn"]["verdict"] == "reference"


def test_scores_are_computed_when_a_run_was_not_evaluated(runs: dict[str, Path], tmp_path: Path) -> None:
    assert not (runs["linear"] / "report").exists()
    run_compare([runs["seed-cnn"], runs["linear"]], tmp_path / "out", device="cpu")
    expected = run_evaluation(runs["cache"], runs["linear"], tmp_path / "linear-report", device="cpu", report=False)
    row = _rows(tmp_path / "out")["linear"]
    assert float(row["mean_iou"]) == pytest.approx(expected["mean_iou"], abs=1e-9)
    assert float(row["pooled_iou"]) == pytest.approx(expected["pooled_iou"], abs=1e-9)
    assert not (runs["linear"] / "report").exists()  # compare reads run folders, it does not write into them


@pytest.mark.parametrize("key, value", [("checkpoint_sha256", "0" * 64), ("cache_fingerprint", "0" * 16)])
def test_an_evaluation_of_an_older_checkpoint_or_another_cache_is_not_trusted(runs: dict[str, Path], tmp_path: Path,
                                                                             key: str, value: str) -> None:
    stale = Path(shutil.copytree(runs["seed-cnn"], tmp_path / "stale"))
    metrics = json.loads((stale / "report" / "metrics.json").read_text())
    _plant_shift(stale, 0.3)
    (stale / "report" / "metrics.json").write_text(json.dumps({**metrics, key: value}))
    run_compare([runs["seed-cnn"], stale], tmp_path / "out", device="cpu")
    rows = _rows(tmp_path / "out")
    assert rows["stale"]["mean_iou"] == rows["seed-cnn"]["mean_iou"]  # scored afresh, not read


def test_the_leaderboard_lists_differing_fields_and_curves(runs: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status, output = _invoke(runs["seed-cnn"], runs["linear"], "--device", "cpu")
    assert status == 0 and output.startswith("leaderboard of 2 entries: best "), output
    rows = _rows(tmp_path / "compare")  # the default --out without a sweep folder
    assert {row["decoder"] for row in rows.values()} == {"seed-cnn", "linear"}
    assert all(int(row["epochs"]) == 2 and float(row["train_seconds"]) > 0 for row in rows.values())
    assert (tmp_path / "compare" / "val_iou_curves.png").stat().st_size > 10_000
    assert "<script" not in (tmp_path / "compare" / "leaderboard.html").read_text()


@pytest.mark.parametrize("other, message", [
    ("other-cache", "were trained on different caches"),
    ("other-split", "validate on different images"),
])
def test_runs_that_cannot_be_paired_are_refused(runs: dict[str, Path], tmp_path: Path, other: str,
                                                message: str) -> None:
    status, output = _invoke(runs["seed-cnn"], runs[other], "--out", tmp_path / "out", "--device", "cpu")
    assert status == 2 and message in output, output
    assert str(runs["seed-cnn"]) in output and str(runs[other]) in output
    assert not (tmp_path / "out").exists()


def test_a_sweep_keeps_its_own_leaderboard_when_compared_with_other_runs(runs: dict[str, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", "--cache", str(runs["cache"]), "--out", str(sweep), "--lr", "3e-3",
                                       "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    own = (sweep / "leaderboard.csv").read_text()
    monkeypatch.chdir(tmp_path)
    status, output = _invoke(sweep, runs["linear"], "--device", "cpu")
    assert status == 0, output
    assert (sweep / "leaderboard.csv").read_text() == own and len(_rows(tmp_path / "compare")) == 2


def test_a_folder_that_is_no_run_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    status, output = _invoke(runs["seed-cnn"], tmp_path, "--out", tmp_path / "out")
    assert status == 2 and "neither a run, a cross-validation nor a sweep folder" in output, output
    status, output = _invoke(runs["seed-cnn"], "--baseline", tmp_path, "--out", tmp_path / "out")
    assert status == 2 and "not a run or cross-validation folder" in output, output
    status, output = _invoke(runs["seed-cnn"], tmp_path / "nowhere", "--out", tmp_path / "out")
    assert status == 2 and "nowhere: not found" in output, output


def test_cross_validations_on_the_same_folds_are_one_entry_each(runs: dict[str, Path], tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, batch_size=8, folds=3)
    for decoder in ("seed-cnn", "linear"):
        run_cross_validation(runs["cache"], tmp_path / decoder, TrainConfig(**{**config.__dict__, "decoder": decoder}),
                             device="cpu")
    board = run_compare([tmp_path / "seed-cnn", tmp_path / "linear"], tmp_path / "out", device="cpu")
    cv = json.loads((tmp_path / "seed-cnn" / "cv.json").read_text())
    entry = {entry.name: entry for entry in board.entries}["seed-cnn"]
    fold_ious = [fold["mean_iou"] for fold in cv["folds"]]
    assert entry.folds == 3 and entry.mean_iou == pytest.approx(np.mean(fold_ious))
    assert entry.mean_iou_std == pytest.approx(np.std(fold_ious))
    comparison = next(entry.comparison for entry in board.entries if entry.comparison is not None)
    assert comparison.n == 100  # every image, validated once over the folds
    other = next(entry for entry in board.entries if entry.comparison is not None)
    best = next(entry for entry in board.entries if entry.comparison is None)
    # folds of 34, 33 and 33 images: Δ on the basis of the shown means (means of fold means), to all digits
    assert comparison.mean_difference == pytest.approx(other.mean_iou - best.mean_iou, rel=0, abs=1e-12)
    status, output = _invoke(tmp_path / "seed-cnn", runs["seed-cnn"], "--out", tmp_path / "mixed")
    assert status == 2 and "a single split vs cross-validation" in output, output


def test_one_entry_is_one_entry(runs: dict[str, Path], tmp_path: Path) -> None:
    status, output = _invoke(runs["seed-cnn"], "--out", tmp_path / "out", "--device", "cpu")
    assert status == 0 and output.startswith("leaderboard of 1 entry: "), output
    assert "- 1 entry on cache " in (tmp_path / "out" / "leaderboard.md").read_text()


def test_a_leaderboard_never_replaces_one_of_other_folders(runs: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pair = [runs["seed-cnn"], runs["linear"]]
    assert _invoke(*pair, "--out", tmp_path / "board", "--device", "cpu")[0] == 0
    before = (tmp_path / "board" / "leaderboard.csv").read_text()
    status, output = _invoke(runs["seed-cnn"], "--out", tmp_path / "board", "--device", "cpu")
    assert status == 2 and f"--out {tmp_path / 'board'}: holds the leaderboard of other folders (" in output, output
    assert (tmp_path / "board" / "leaderboard.csv").read_text() == before
    status, output = _invoke(*reversed(pair), "--out", tmp_path / "board", "--device", "cpu")
    assert status == 0, output  # the same folders again: their own leaderboard, brought up to date

    sweep = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", "--cache", str(runs["cache"]), "--out", str(sweep), "--lr", "3e-3",
                                       "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    own = (sweep / "leaderboard.csv").read_text()
    for folders, out in (([runs["linear"]], sweep), ([sweep, runs["linear"]], sweep),
                         ([runs["linear"]], runs["seed-cnn"])):
        status, output = _invoke(*folders, "--out", out, "--device", "cpu")
        assert status == 2 and f"--out {out}: holds a " in output and "pass another --out" in output, output
    assert (sweep / "leaderboard.csv").read_text() == own and not (runs["seed-cnn"] / "leaderboard.csv").exists()
    assert _invoke(sweep, "--device", "cpu")[0] == 0  # the sweep alone: its own leaderboard

    monkeypatch.chdir(tmp_path)  # the default ./compare follows the same rule
    assert _invoke(*pair, "--device", "cpu")[0] == 0
    status, output = _invoke(runs["linear"], sweep, "--device", "cpu")
    assert status == 2 and "compare, the default --out, holds the leaderboard of other folders (" in output \
        and "; pass --out, or remove compare first" in output, output
    status, output = _invoke(runs["seed-cnn"], sweep, runs["linear"], "--device", "cpu")  # every entry of it, and more
    assert status == 0 and output.startswith("leaderboard of 3 entries: ") and output.endswith(
        "; written to compare\n"), output
    assert len(_rows(tmp_path / "compare")) == 3 and _invoke(*pair, "--device", "cpu")[0] == 2
    result = CliRunner().invoke(main, ["sweep", "--cache", str(runs["cache"]), "--out", "compare", "--epochs", "1"])
    assert result.exit_code == 2 and "compare: holds the leaderboard of a compare" in result.output, result.output


def test_a_cross_validated_sweep_with_an_unfinished_config_shows_the_finished_ones(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "sweep"
    interrupt_at_pass(monkeypatch, 7)  # config 1: folds 1-2 (4 passes); config 2: fold 1 (2), then stops in fold 2
    args = ["sweep", "--cache", str(runs["cache"]), "--out", str(sweep), "--decoder", "seed-cnn,linear", "--epochs",
            "1", "--batch-size", "8", "--cv", "2", "--device", "cpu"]
    assert CliRunner().invoke(main, args).exit_code == 130
    monkeypatch.undo()
    status, output = _invoke(sweep, "--device", "cpu")
    assert status == 0 and "leaderboard of 1 entry (and 1 unfinished, without scores)" in output, output
    rows = _rows(sweep)
    assert rows["decoder=seed-cnn"]["verdict"] == "reference" and rows["decoder=seed-cnn"]["folds"] == "2"
    assert rows["decoder=linear"]["verdict"] == "unfinished: 1 of 2 folds trained"
    assert "Without scores: decoder=linear is unfinished — 1 of 2 folds trained." in (sweep / "leaderboard.md").read_text()
    status, output = _invoke(sweep / "decoder=linear", "--out", tmp_path / "alone", "--device", "cpu")
    assert status == 2 and "decoder=linear: 1 of 2 folds trained; nothing to compare" in output, output


def test_a_failed_run_has_no_scores_is_never_the_reference_and_no_baseline(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)  # lr 1e6 diverges in epoch 2: a failed run folder
    sweep, failed, good = tmp_path / "sw", tmp_path / "sw" / "lr=1e6", tmp_path / "sw" / "lr=0.001"
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(sweep), "--lr", "1e-3,1e6",
                                       "--epochs", "3", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0 and RunFolder(failed).read_record().epochs_done >= 1, result.output
    run = tmp_path / "m4"
    run_training(cache, run, TrainConfig(epochs=3, batch_size=4, lr=1e-3), device="cpu")
    for folders in ([sweep], [sweep, run], [run]):  # a failed config as --baseline: refused, in one line
        status, output = _invoke(*folders, "--baseline", failed, "--out", tmp_path / "out", "--device", "cpu")
        assert status == 2 and output.startswith(f"Error: --baseline {failed}: its training failed, so it has no "
                                                 f"scores to compare with; ") and output.count("\n") == 1, output
    status, output = _invoke(sweep, run, "--baseline", good, "--out", tmp_path / "b1", "--device", "cpu")
    assert status == 0, output  # the sweep's own entry, not a second one
    rows = _rows(tmp_path / "b1")
    assert list(rows) == ["lr=0.001", "m4", "lr=1e6"] and rows["lr=0.001"]["verdict"] == "reference"
    status, output = _invoke(failed, run, "--out", tmp_path / "c3", "--device", "cpu")  # named on its own
    assert status == 0 and "leaderboard of 1 entry (and 1 failed, without scores): best m4" in output, output
    rows = _rows(tmp_path / "c3")
    assert rows["m4"]["verdict"] == "reference" and rows["lr=1e6"]["mean_iou"] == ""
    assert rows["lr=1e6"]["verdict"] == f"failed: {RunFolder(failed).read_record().failure}"
    text = (tmp_path / "c3" / "leaderboard.md").read_text()
    assert "Without scores: lr=1e6 failed — loss is NaN or infinite" in text and "))" not in text


def test_entries_of_the_same_name_get_as_many_parent_names_as_tell_them_apart(runs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    copies = [Path(shutil.copytree(runs["seed-cnn"], tmp_path / side / "x" / "run")) for side in ("a", "b")]
    board = run_compare(copies, tmp_path / "out", device="cpu")
    assert sorted(entry.name for entry in board.entries) == ["a/x/run", "b/x/run"]
