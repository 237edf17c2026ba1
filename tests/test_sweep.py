"""`fishseg sweep`: the grid, its folders, one load of the cache, skipping and resuming, and bad grids."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fishseg.training.sweep as sweep_module
import fishseg.training.train as train_module
from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.errors import FishsegError
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import RunFolder
from fishseg.training.sweep import expand_grid, read_grid_file
from fishseg.training.train import run_training
from tests.helpers import interrupt_at_pass, write_toy_cache

GRID_ARGS = ["--decoder", "seed-cnn,linear", "--lr", "3e-3,1e-3", "--epochs", "2", "--batch-size", "4"]
NAMES = {"decoder=seed-cnn,lr=0.003", "decoder=seed-cnn,lr=0.001", "decoder=linear,lr=0.003",
         "decoder=linear,lr=0.001"}


def _sweep(cache: Path, out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(out), "--device", "cpu", *args])
    return result.exit_code, result.output


def test_the_grid_is_the_cartesian_product_named_by_what_varies() -> None:
    configs = expand_grid({"decoder": ("seed-cnn", "linear"), "lr": (1e-3, 3e-4), "epochs": (5,)}, folds=3)
    assert [entry.name for entry in configs] == ["decoder=seed-cnn,lr=0.001", "decoder=seed-cnn,lr=0.0003",
                                                 "decoder=linear,lr=0.001", "decoder=linear,lr=0.0003"]
    assert {(c.config.decoder, c.config.lr, c.config.epochs, c.config.folds) for c in configs} == {
        ("seed-cnn", 1e-3, 5, 3), ("seed-cnn", 3e-4, 5, 3), ("linear", 1e-3, 5, 3), ("linear", 3e-4, 5, 3)}
    assert [entry.name for entry in expand_grid({"epochs": (5,)})] == ["run"]


@pytest.mark.parametrize("grid, message", [
    ({"decoder": ("seed-cnn", "unet")}, "sweep value decoder 'unet': expected one of linear, seed-cnn, progressive"),
    ({"epochs": (5.5,)}, "sweep value epochs 5.5: expected a whole number >= 1"),
    ({"lr": (float("nan"),)}, "sweep value lr nan: expected a finite number"),
])
def test_bad_grid_values_are_named(grid: dict, message: str) -> None:
    with pytest.raises(FishsegError, match=message):
        expand_grid(grid)


def test_a_grid_file_takes_lists_and_scalars_and_names_unknown_fields(tmp_path: Path) -> None:
    good = tmp_path / "grid.toml"
    good.write_text('decoder = ["seed-cnn", "linear"]\nbatch-size = 4\nlr = [1e-3, 3e-4]\n')
    assert read_grid_file(good, ("decoder", "batch_size", "lr")) == {
        "decoder": ("seed-cnn", "linear"), "batch_size": (4,), "lr": (1e-3, 3e-4)}
    values = tmp_path / "values.toml"
    values.write_text('decoder = ["seed-cnn", "unet"]\n')
    with pytest.raises(FishsegError, match="values.toml: decoder 'unet': expected one of"):
        read_grid_file(values, ("decoder",))
    twice = tmp_path / "twice.toml"
    twice.write_text("batch_size = [4]\nbatch-size = [8]\n")
    with pytest.raises(FishsegError, match=r"twice.toml: the field batch_size is given twice \(as batch-size and "
                                           r"batch_size\); keep one"):
        read_grid_file(twice, ("batch_size",))
    literal = tmp_path / "literal.toml"
    literal.write_text("lr = [1e-3]\nepochs = 2\nlr = [3e-4]\n")
    with pytest.raises(FishsegError, match="literal.toml: the field lr is given twice; keep one"):
        read_grid_file(literal, ("lr", "epochs"))
    bad = tmp_path / "bad.toml"
    bad.write_text('decoders = ["linear"]\nlearning_rate = 1\n')
    with pytest.raises(FishsegError, match="bad.toml: unknown fields decoders, learning_rate; known: decoder"):
        read_grid_file(bad, ("decoder", "lr"))
    broken = tmp_path / "broken.toml"
    broken.write_text("decoder = [\n")
    with pytest.raises(FishsegError, match="broken.toml: not valid TOML"):
        read_grid_file(broken, ("decoder",))


def test_a_sweep_trains_every_config_once_from_one_load_of_the_cache(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=20)
    loads = []
    real_open = train_module.TrainingData.open
    monkeypatch.setattr(sweep_module.TrainingData, "open",
                        lambda *args, **kwargs: loads.append(1) or real_open(*args, **kwargs))
    status, output = _sweep(cache, tmp_path / "sweep", *GRID_ARGS)
    assert status == 0, output
    assert loads == [1]
    assert {path.name for path in (tmp_path / "sweep").iterdir() if path.is_dir()} == NAMES
    assert output.count("] decoder=") == 4 and "[4/4] " in output and "s left)" in output
    assert "4 configs (4 trained now) in " in output and "% of the rest inside epochs" in output
    for name in NAMES:
        record = RunFolder(tmp_path / "sweep" / name).read_record()
        assert (record.status, record.epochs_done, record.train_config.batch_size) == ("finished", 2, 4)
    with (tmp_path / "sweep" / "leaderboard.csv").open(newline="") as handle:
        assert {row["name"] for row in csv.DictReader(handle)} == NAMES
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["grid"]["lr"] == [3e-3, 1e-3] and len(sweep["configs"]) == 4

    stamps = {name: (tmp_path / "sweep" / name / "run.json").stat().st_mtime_ns for name in NAMES}
    status, output = _sweep(cache, tmp_path / "sweep", *GRID_ARGS)
    assert status == 0 and "4 configs (0 trained now)" in output, output
    assert stamps == {name: (tmp_path / "sweep" / name / "run.json").stat().st_mtime_ns for name in NAMES}
    assert loads == [1]  # nothing left to train: the cache is not even loaded


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=20)
    interrupt_at_pass(monkeypatch, 7)  # config 1: epochs 1-2 (4 passes); config 2: epoch 1 (2), then epoch 2
    status, output = _sweep(cache, tmp_path / "sweep", *GRID_ARGS)
    assert status == 130 and "run the same command again to continue" in output, output
    first, second = (tmp_path / "sweep" / name for name in ("decoder=seed-cnn,lr=0.003", "decoder=seed-cnn,lr=0.001"))
    assert RunFolder(first).read_record().status == "finished"
    assert (RunFolder(second).read_record().status, RunFolder(second).read_record().epochs_done) == ("interrupted", 1)
    monkeypatch.undo()
    status, output = _sweep(cache, tmp_path / "sweep", *GRID_ARGS)
    assert status == 0 and "4 configs (3 trained now)" in output, output
    resumed = RunFolder(second).read_record()
    straight = run_training(cache, tmp_path / "straight", resumed.train_config, device="cpu")
    assert resumed.status == "finished"
    assert resumed.best_val_iou == pytest.approx(straight.best_val_iou, abs=1e-6)


def test_a_sweep_folder_holds_one_grid(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    status, output = _sweep(cache, tmp_path / "sweep", "--decoder", "seed-cnn,linear", "--epochs", "1")
    assert status == 0, output
    before = (tmp_path / "sweep" / "sweep.json").read_text()
    status, output = _sweep(cache, tmp_path / "sweep", "--decoder", "linear", "--lr", "1e-3,3e-4", "--epochs", "1")
    assert status == 2 and "holds a sweep of another grid (2 configs: decoder=seed-cnn, decoder=linear)" in output
    assert (tmp_path / "sweep" / "sweep.json").read_text() == before
    assert sorted(path.name for path in (tmp_path / "sweep").iterdir() if path.is_dir()) == [
        "decoder=linear", "decoder=seed-cnn"]


def test_a_value_listed_twice_is_named() -> None:
    with pytest.raises(FishsegError, match="sweep value lr lists 0.001 more than once"):
        expand_grid({"lr": (1e-3, 1e-3)})


def test_a_foreign_run_under_a_config_name_is_refused(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    run_training(cache, tmp_path / "sweep" / "decoder=linear,lr=0.001", TrainConfig(epochs=1), device="cpu")
    status, output = _sweep(cache, tmp_path / "sweep", *GRID_ARGS)
    assert status == 2 and "decoder=linear,lr=0.001: holds a run of other settings" in output, output
    assert "decoder 'seed-cnn' → 'linear'" in output and not (tmp_path / "sweep" / "sweep.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--decoder", "seed-cnn,unet"], "'unet' is not one of"),
    (["--lr", "1e-3,inf"], "is not a finite number"),
    (["--lr", "1e-3,,3e-4"], "an empty value in the list"),
    (["--cv", "1"], "K-fold cross-validation needs K >= 2 (0: one train/val split)"),
])
def test_bad_sweep_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    status, output = _sweep(cache, tmp_path / "sweep", *args)
    assert status == 2 and message in output, output
    assert "Traceback" not in output and not (tmp_path / "sweep").exists()


def test_a_cross_validated_sweep_counts_each_config_once(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    status, output = _sweep(cache, tmp_path / "sweep", "--decoder", "seed-cnn,linear", "--epochs", "1",
                            "--batch-size", "4", "--cv", "2")
    assert status == 0, output
    for name in ("decoder=seed-cnn", "decoder=linear"):
        cv = json.loads((tmp_path / "sweep" / name / "cv.json").read_text())
        assert cv["status"] == "finished" and len(cv["folds"]) == 2
    with (tmp_path / "sweep" / "leaderboard.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row["folds"] == "2" and row["mean_iou_std"] for row in rows)


def test_layer_sets_are_listed_with_a_slash_and_name_their_folders(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text("layers = [[12], [4, 8, 12]]\n")
    assert read_grid_file(grid_file, ["layers"]) == {"layers": ([12], [4, 8, 12])}
    configs = expand_grid({"layers": ((12,), (4, 8, 12), ())})
    assert [(entry.name, entry.config.layers) for entry in configs] == [
        ("layers=12", (12,)), ("layers=4+8+12", (4, 8, 12)), ("layers=all", ())]
    result = CliRunner().invoke(main, ["sweep", "--cache", str(tmp_path / "none.h5"), "--out", str(tmp_path / "s"),
                                       "--layers", "12/4,8,12/-1,x"])
    assert result.exit_code == 2 and "'-1,x': expected block indices separated by commas" in result.output


def _scores(sweep_dir: Path) -> dict[str, tuple]:
    """Each config's history (but seconds) and its leaderboard scores."""
    def history(name: str) -> list:
        rows = json.loads((sweep_dir / name / "history.json").read_text())
        return [{key: value for key, value in row.items() if key != "seconds"}
                for row in (*rows["epochs"], *rows["iterations"]["train"], *rows["iterations"]["val"])]

    with (sweep_dir / "leaderboard.csv").open(newline="") as handle:
        board = {row["name"]: row["mean_iou"] for row in csv.DictReader(handle)}
    return {name: (history(name), board[name]) for name in NAMES}


def test_concurrent_jobs_give_the_results_of_one_config_at_a_time(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=20)
    for jobs in ("1", "2"):
        status, output = _sweep(cache, tmp_path / f"jobs-{jobs}", *GRID_ARGS, "--jobs", jobs)
        assert status == 0 and "4 configs (4 trained now)" in output, output
        share = re.search(r"(\d+)% of the rest(?: \(of 2 jobs' time\))? inside epochs", output)
        assert share and 0 < int(share.group(1)) <= 100 and (jobs == "2") == ("2 jobs' time" in output), output
    assert _scores(tmp_path / "jobs-1") == _scores(tmp_path / "jobs-2")
    assert _sweep(cache, tmp_path / "bad", *GRID_ARGS, "--jobs", "0")[0] == 2


def _board(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with (sweep_dir / "leaderboard.csv").open(newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_a_failing_config_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)  # lr 1e6 diverges in epoch 2: a failed run folder
    args = ["--lr", "1e-3,1e6", "--epochs", "3", "--batch-size", "4"]
    status, output = _sweep(cache, tmp_path / "sweep", *args)
    assert status == 0, output
    assert "1 config failed, listed without scores (a rerun skips them; --retry-failed trains them again from the " \
           "start):\n  lr=1e6 — loss is NaN or infinite: the decoder diverged on finite features; lower --lr " \
           "(the last good checkpoint is kept)\n" in output
    assert "leaderboard of 1 entry (and 1 failed, without scores): best lr=0.001" in output
    assert "2 configs (2 trained now, 1 of them failed) in " in output
    failed = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["failed"]
    assert list(failed) == ["lr=1e6"] and "diverged" in failed["lr=1e6"]
    board = _board(tmp_path / "sweep")
    assert board["lr=0.001"]["verdict"] == "reference"
    assert RunFolder(tmp_path / "sweep" / "lr=0.001").read_record().status == "finished"
    assert board["lr=1e6"]["verdict"].startswith("failed: loss is NaN or infinite")
    assert board["lr=1e6"]["mean_iou"] == "" and "Without scores: lr=1e6 failed — loss is NaN" in \
        (tmp_path / "sweep" / "leaderboard.md").read_text()
    record = RunFolder(tmp_path / "sweep" / "lr=1e6").read_record()  # the run says so too, with the same reason
    assert (record.status, record.failure) == ("failed", failed["lr=1e6"])

    status, output = _sweep(cache, tmp_path / "sweep", *args)
    assert status == 0 and "2 configs: 0 to train, 1 finished already, 1 failed before" in output, output
    assert "2 configs (0 trained now)" in output
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "sweep"), "--device", "cpu"])
    assert result.exit_code == 0 and _board(tmp_path / "sweep")["lr=1e6"]["verdict"].startswith("failed")

    status, output = _sweep(cache, tmp_path / "sweep", *args, "--retry-failed")
    assert status == 0 and "2 configs: 1 to train, 1 finished already" in output and "1 config failed" in output


def test_every_config_failing_ends_with_their_reasons(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    status, output = _sweep(cache, tmp_path / "sweep", "--lr", "1e6,1e7", "--epochs", "2", "--batch-size", "4")
    assert status == 2 and "no runs to compare yet: lr=1e6 failed — loss is NaN" in output, output
    assert "Traceback" not in output and "kept))" not in output
    status, output = _sweep(cache, tmp_path / "sweep", "--lr", "1e6,1e7", "--epochs", "2", "--batch-size", "4")
    assert status == 2 and "2 configs: 0 to train, 0 finished already, 2 failed before" in output, output


def test_the_plan_is_said_and_a_large_sweep_needs_a_yes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    decays = ",".join(str(k / 1000) for k in range(51))
    status, output = _sweep(cache, tmp_path / "sweep", "--weight-decay", decays, "--epochs", "1")
    assert status == 2, output
    assert output.startswith("51 configs: 51 to train, 0 finished already; about ") and "timed training steps" in output
    assert output.endswith("Error: 51 configs to train, more than 50: add --yes to start them (there is no terminal "
                           "to ask)\n")
    assert not (tmp_path / "sweep").exists()
    monkeypatch.setattr("fishseg.cli._interactive", lambda: True)
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(tmp_path / "sweep"), "--device",
                                       "cpu", "--weight-decay", decays, "--epochs", "1"], input="n\n")
    assert result.exit_code == 1, result.output
    assert result.output.endswith("Train 51 configs? [y/N]: n\nSweep not started: nothing was written.\n"), \
        result.output
    assert "Aborted" not in result.output and not (tmp_path / "sweep").exists()


def test_no_answer_at_the_prompt_starts_no_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End of input (or Ctrl-C) at the prompt is a no, said as one: not a bare "Aborted!"."""
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    monkeypatch.setattr("fishseg.cli._interactive", lambda: True)
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(tmp_path / "sweep"), "--device",
                                       "cpu", "--weight-decay", ",".join(str(k / 100) for k in range(51)), "--epochs", "1"], input="")
    assert result.exit_code == 1 and result.output.endswith("\nSweep not started: nothing was written.\n"), \
        result.output
    assert "Aborted" not in result.output and not (tmp_path / "sweep").exists()


def test_the_estimate_counts_every_epoch_fold_and_training_image() -> None:
    configs = expand_grid({"decoder": ("linear", "seed-cnn"), "epochs": (2,), "val_fraction": (0.25,)})
    assert sweep_module.estimate_seconds(configs, 40, {"linear": 0.01, "seed-cnn": 0.1}) == pytest.approx(
        2 * 30 * 0.01 + 2 * 30 * 0.1)
    folded = expand_grid({"epochs": (3,)}, folds=4)
    assert sweep_module.estimate_seconds(folded, 40, {"seed-cnn": 0.5}) == pytest.approx(3 * 4 * 30 * 0.5)
    plan = sweep_module.SweepPlan(configs=60, to_train=51, finished=9, failed=0, seconds=5400)
    assert plan.needs_confirmation and plan.describe().startswith("60 configs: 51 to train, 9 finished already; "
                                                                  "about 1.5 h of training")
    assert not sweep_module.SweepPlan(60, 50, 10, 0, 30).needs_confirmation


def test_layer_sets_naming_the_same_blocks_are_refused(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)  # one block cached: block 1, the last
    for layers, shown in (("-1/1", "-1 and 1"), ("all/-1", "all and -1")):
        status, output = _sweep(cache, tmp_path / "sweep", "--layers", layers, "--epochs", "1")
        assert status == 2 and f"sweep value layers lists {shown}, the same blocks (1) of " in output, output
        assert not (tmp_path / "sweep").exists()


def test_a_grid_file_gives_the_folds_and_the_cache_path_is_recorded_absolute(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_toy_cache(tmp_path / "toy.h5", n_images=12)
    Path("grid.toml").write_text('cv = 2\ndecoder = "linear"\nepochs = 1\nbatch-size = 4\n')
    status, output = _sweep(Path("toy.h5"), Path("sweep"), "--grid", "grid.toml")
    assert status == 0, output
    sweep = json.loads(Path("sweep/sweep.json").read_text())
    assert sweep["folds"] == 2 and (tmp_path / "sweep" / "run" / "cv.json").is_file()
    fold = RunFolder(Path("sweep/run/fold-1")).read_record()
    assert sweep["cache"]["path"] == str(tmp_path / "toy.h5") == fold.cache["path"]
    Path("several.toml").write_text("folds = [2, 3]\n")
    with pytest.raises(FishsegError, match="several.toml: cv takes one value"):
        read_grid_file(Path("several.toml"), ("decoder",))


def _fake_clock(monkeypatch: pytest.MonkeyPatch, seconds: list[float]) -> object:
    """time.perf_counter as sweep.py sees it, advanced by the next of ``seconds`` at each call of the step."""
    clock = {"now": 0.0, "left": list(seconds)}
    monkeypatch.setattr(sweep_module.time, "perf_counter", lambda: clock["now"])
    return lambda: clock.update(now=clock["now"] + clock["left"].pop(0))


def test_passes_are_timed_until_there_are_enough_for_a_median(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause of the machine in one pass (0.25 s against 1/64 s) does not move the median; fast passes go on
    to half a second, slow ones stop at 5 passes or 5 s."""
    durations = sweep_module.timed_passes(_fake_clock(monkeypatch, [0.25, *[1 / 64] * 100]))
    assert len(durations) == 17 and sum(durations) == 0.5 and sorted(durations)[len(durations) // 2] == 1 / 64
    assert len(sweep_module.timed_passes(_fake_clock(monkeypatch, [1e-4] * 100))) == 50
    assert len(sweep_module.timed_passes(_fake_clock(monkeypatch, [0.5] * 100))) == 5
    assert sweep_module.timed_passes(_fake_clock(monkeypatch, [2.0] * 100)) == [2.0] * 3  # 6 s ≥ 5 s
    with pytest.raises(ValueError, match="out of order"):
        sweep_module.PassLimits(min_passes=0)


def test_seconds_per_image_is_the_median_pass_over_its_images_after_a_pass_over_every_batch_shape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10 images in batches of 4: the untimed pass covers the batch of 2 too, then each pass's seconds are over
    10 images."""
    cache = FeatureCache(write_toy_cache(tmp_path / "toy.h5", n_images=10))
    passes: list[int] = []
    real_epoch = sweep_module.run_epoch
    monkeypatch.setattr(sweep_module, "run_epoch", lambda decoder, split, *args, **kwargs: (
        passes.append(len(split)), real_epoch(decoder, split, *args, **kwargs))[1])
    monkeypatch.setattr(sweep_module, "timed_passes", lambda step: (step(), [0.3, 0.01, 0.02])[1])
    data = train_module.TrainingData.open(cache, False, device=torch.device("cpu"))
    seconds = sweep_module.seconds_per_image(data, TrainConfig(batch_size=4), torch.device("cpu"))
    cache.file.close()
    assert passes == [10, 10] and seconds == pytest.approx(0.02 / 10)


def test_a_sweep_resumed_on_changed_content_counts_the_changed_images(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    args = ["--decoder", "linear,seed-cnn", "--epochs", "1"]
    assert _sweep(cache, tmp_path / "sweep", *args)[0] == 0
    write_toy_cache(cache, n_images=12, seed=5)  # the same images and settings, other content
    status, output = _sweep(cache, tmp_path / "sweep", *args)
    assert status == 2 and output.count("\n") == 1, output
    assert "sweep.json: made from cache" in output and "; of its 12 images, 12 changed content (" in output, output


@pytest.mark.parametrize("args, message", [
    (["--seed", "1,2"], "sweep value seed lists 1, 2: the seed draws the validation images too, so its configs would "
                        "validate on different images and could not be compared (sweeps of different seeds neither); "
                        "give seed one value; to see how much results vary with the validation images, use --cv K"),
    (["--seed", "1,2", "--cv", "3"], "sweep value seed lists 1, 2: the seed draws the validation images too"),
    (["--split", "random,grouped"], "sweep value split lists random, grouped: the split method chooses the "
                                    "validation images"),
    (["--val-fraction", "0.2,0.3"], "sweep value val_fraction lists 0.2, 0.3: the fraction chooses the validation "
                                    "images"),
    (["--val-fraction", "0.2,0.3", "--cv", "2"], "with --cv the folds choose the validation images, not "
                                                 "val_fraction, so its configs would train alike; give val_fraction "
                                                 "one value"),
])
def test_a_grid_whose_configs_would_validate_on_other_images_is_refused_before_training(
        tmp_path: Path, args: list[str], message: str) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    status, output = _sweep(cache, tmp_path / "sweep", *args, "--epochs", "1", "--batch-size", "4")
    assert status == 2 and output.startswith("Error: ") and message in output and output.count("\n") == 1, output
    assert not (tmp_path / "sweep").exists()


def test_group_patterns_are_refused_as_other_validation_images_or_as_unused() -> None:
    patterns = ("^class", "^c")
    with pytest.raises(FishsegError, match="the groups choose the validation images of a grouped split"):
        expand_grid({"split": ("grouped",), "group_pattern": patterns})
    with pytest.raises(FishsegError, match="a random split ignores the groups, so its configs would train alike"):
        expand_grid({"group_pattern": patterns})
