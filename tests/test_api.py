"""The public API end to end on tiny data: typed results that say what was written, with the CLI's behaviour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch
from click.testing import CliRunner

import fishseg
import fishseg.end_to_end  # noqa: F401 (imported, a submodule must not replace an API function on the package)
from fishseg.bench.call import main as call_main
from fishseg.bench.call import torchrun_call
from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.data.synthetic import SPECIES
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import RunFolder
from fishseg.training.crossval import CV_METRICS
from tests.helpers import TINY_IMAGE_SIZE, interrupt_at_pass, write_toy_cache

FAST = dict(batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_cache(tmp_path_factory.mktemp("api") / "toy.h5", n_images=12)


@pytest.fixture(scope="module")
def trained(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> fishseg.TrainResult:
    return fishseg.train(str(toy), str(tmp_path_factory.mktemp("api-run") / "run"), epochs=2, **FAST)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_every_public_name_is_there() -> None:
    assert all(getattr(fishseg, name) is not None for name in fishseg.__all__)
    assert fishseg.__version__ == fishseg.version.__version__


def test_extract_returns_the_cache_it_wrote(tmp_path: Path, kaggle_root: Path, tiny_backbone: Path) -> None:
    out = tmp_path / "cache.h5"
    result = fishseg.extract(str(kaggle_root), str(out), backbone=str(tiny_backbone), image_size=TINY_IMAGE_SIZE,
                             preview_size=32, num_workers=0, device="cpu", precision="fp32")
    with FeatureCache(out) as cache:
        assert result == fishseg.ExtractResult(out, len(cache), (), cache.backbone.name, True)
    assert result.images == 12
    config = fishseg.ExtractConfig(backbone=str(tiny_backbone), image_size=TINY_IMAGE_SIZE, preview_size=32)
    assert fishseg.extract(kaggle_root, out, config=config, num_workers=0, device="cpu") == result  # up to date
    with pytest.raises(TypeError, match="either as `config` or as keywords"):
        fishseg.extract(kaggle_root, out, config=config, image_size=32)


def test_train_returns_the_record_it_wrote(trained: fishseg.TrainResult) -> None:
    record = RunFolder(trained.out).read_record()
    assert isinstance(trained.out, Path) and trained.record == record
    assert (trained.status, trained.epochs_planned, trained.best_epoch) == ("finished", 2, record.best_epoch)
    assert 0 <= trained.best_val_iou == record.best_val_iou and 1 <= trained.best_epoch <= 2
    assert trained.val_with_duplicate_in_train == record.split["val_with_duplicate_in_train"]
    assert record.precision == "fp32" and not record.deterministic


def test_train_refuses_an_existing_run_as_the_cli_does(toy: Path, trained: fishseg.TrainResult) -> None:
    before = _snapshot(trained.out)
    with pytest.raises(fishseg.FishsegError, match="already holds a run"):
        fishseg.train(toy, trained.out, epochs=2, **FAST)
    cli = CliRunner().invoke(main, ["train", "--cache", str(toy), "--out", str(trained.out), "--epochs", "2"])
    assert cli.exit_code == 2 and "already holds a run" in cli.output
    with pytest.raises(TypeError, match="unexpected keyword learning_rate"):
        fishseg.train(toy, trained.out, learning_rate=0.1)
    assert _snapshot(trained.out) == before


def test_a_config_object_and_fields_beside_it(toy: Path, tmp_path: Path) -> None:
    config = fishseg.TrainConfig(decoder="linear", epochs=3, batch_size=4)
    result = fishseg.train(toy, tmp_path / "run", config=config, epochs=1, device="cpu")
    assert result.record.train_config == fishseg.TrainConfig(decoder="linear", epochs=1, batch_size=4)


@pytest.fixture
def stopped(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 3-epoch run with lr 3e-3 and flips, stopped by Ctrl-C in epoch 2 (1 epoch done)."""
    interrupt_at_pass(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        fishseg.train(toy, tmp_path / "stopped", epochs=3, lr=3e-3, augment="flips", **FAST)
    monkeypatch.undo()
    assert RunFolder(tmp_path / "stopped").read_record().epochs_done == 1
    return tmp_path / "stopped"


def test_resume_through_the_api_equals_the_clis(toy: Path, stopped: Path, tmp_path: Path) -> None:
    by_cli = shutil.copytree(stopped, tmp_path / "by-cli")
    with pytest.raises(fishseg.FishsegError, match=r"other settings \(augment 'flips' → 'none'\)"):
        fishseg.train(toy, stopped, resume=True, lr=3e-3, augment="none", device="cpu")
    result = fishseg.train(str(toy), str(stopped), resume=True, lr=3e-3, device="cpu")  # lr agrees: accepted
    cli = CliRunner().invoke(main, ["train", "--cache", str(toy), "--out", str(by_cli), "--resume", "--lr", "0.003",
                                    "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    assert cli.output.startswith(f"run finished: {by_cli} (best val IoU {result.best_val_iou:.4f} at epoch "
                                 f"{result.best_epoch} of 3;")
    by_api, by_shell = result.record, RunFolder(by_cli).read_record()
    assert by_api.train_config == by_shell.train_config == fishseg.TrainConfig(epochs=3, lr=3e-3, augment="flips",
                                                                                batch_size=4)
    assert (by_api.epochs_done, by_api.best_epoch, by_api.best_val_iou) == (
        by_shell.epochs_done, by_shell.best_epoch, by_shell.best_val_iou) and by_api.epochs_done == 3


def test_resume_needs_a_run(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(fishseg.FishsegError, match="holds no run to resume"):
        fishseg.train(toy, tmp_path / "none", resume=True, device="cpu")
    assert not (tmp_path / "none").exists()


def test_cross_validation_returns_the_folds_and_their_summary(toy: Path, tmp_path: Path) -> None:
    result = fishseg.train(toy, str(tmp_path / "cv"), folds=2, epochs=1, **FAST)
    cv = RunFolder(tmp_path / "cv").read_cv()
    assert isinstance(result, fishseg.CrossValidationResult)
    assert (result.out, result.folds, result.split) == (tmp_path / "cv", 2, "random")
    assert result.runs == (tmp_path / "cv" / "fold-1", tmp_path / "cv" / "fold-2")
    assert all((run / "run.json").is_file() for run in result.runs)
    assert set(result.summary) == set(CV_METRICS)
    assert result.summary["mean_iou"] == (cv.summary["mean_iou"]["mean"], cv.summary["mean_iou"]["std"])
    assert fishseg.CrossValidationResult.read(tmp_path / "cv") == result


def test_evaluate_returns_the_metrics_it_wrote(toy: Path, trained: fishseg.TrainResult, tmp_path: Path) -> None:
    result = fishseg.evaluate(str(toy), str(trained.out), out=str(tmp_path / "report"), device="cpu")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert (result.out, result.report) == (tmp_path / "report", tmp_path / "report" / "report.html")
    assert result.report.is_file() and result.metrics == metrics
    assert (result.n_images, result.mean_iou, result.mean_dice, result.reference_batch_iou, result.random_init) == (
        metrics["n_images"], metrics["mean_iou"], metrics["mean_dice"], metrics["reference_batch_iou"], True)
    assert result.n_images == 2  # 20% of 12


def test_probe_on_a_path_writes_its_json(toy: Path, tmp_path: Path) -> None:
    result = fishseg.probe(str(toy), json=str(tmp_path / "probe.json"))
    written = json.loads((tmp_path / "probe.json").read_text())
    assert result == fishseg.ProbeResult("random", written["accuracy"], written["n_train"], written["n_val"],
                                         ("class0", "class1"), tuple(map(tuple, written["confusion"])), "",
                                         tmp_path / "probe.json")
    assert 0 <= result.accuracy <= 1 and sum(map(sum, result.confusion)) == result.n_val == 2


def test_predict_returns_the_masks_and_csv(kaggle_root: Path, tiny_run: Path, tmp_path: Path) -> None:
    photos = sorted((kaggle_root / "Fish_Dataset").rglob("*.png"))[:2]
    result = fishseg.predict([str(photo) for photo in photos], str(tiny_run), str(tmp_path / "out"), num_workers=0,
                             device="cpu")
    assert (result.out, result.csv, result.skipped) == (tmp_path / "out", tmp_path / "out" / "predictions.csv", ())
    assert len(result.masks) == 2 and all(mask.parent == tmp_path / "out" / "masks" for mask in result.masks)
    with pytest.raises(fishseg.FishsegError, match="earlier predictions"):
        fishseg.predict(photos[0], tiny_run, tmp_path / "out", num_workers=0, device="cpu")


def test_sweep_merges_the_grid_file_the_grid_and_the_lists(toy: Path, tmp_path: Path) -> None:
    (tmp_path / "grid.toml").write_text('decoder = ["linear", "progressive"]\nepochs = 2\nlr = [1e-3, 3e-3]\n')
    result = fishseg.sweep(str(toy), str(tmp_path / "sweep"), grid_file=str(tmp_path / "grid.toml"),
                           grid={"decoder": ["linear", "seed-cnn"]}, lr=3e-3, epochs=[1], **FAST)
    assert (result.configs, result.trained, result.failed_now) == (2, 2, 0)
    assert sorted(path.name for path in (tmp_path / "sweep").iterdir() if path.is_dir()) == [
        "decoder=linear", "decoder=seed-cnn"]
    assert RunFolder(tmp_path / "sweep" / "decoder=linear").read_record().train_config == fishseg.TrainConfig(
        decoder="linear", epochs=1, lr=3e-3, batch_size=4)
    board = fishseg.compare(str(tmp_path / "sweep"), out=str(tmp_path / "board"), device="cpu")
    assert isinstance(board, fishseg.Leaderboard) and board.out_dir == tmp_path / "board"
    assert {entry.name for entry in board.entries} == {"decoder=linear", "decoder=seed-cnn"}
    assert (tmp_path / "board" / "leaderboard.csv").is_file()


def test_a_large_sweep_needs_yes_or_a_confirm_that_says_yes(toy: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fishseg.training.sweep.seconds_per_image", lambda *_: 0.01)  # the estimate is not tested here
    decays = [k / 1000 for k in range(51)]
    with pytest.raises(fishseg.FishsegError, match=r"51 configs to train, more than 50: pass `yes=True`"):
        fishseg.sweep(toy, tmp_path / "sweep", weight_decay=decays, epochs=1, **FAST)
    plans = []
    with pytest.raises(fishseg.SweepDeclined, match="nothing was written"):
        fishseg.sweep(toy, tmp_path / "sweep", weight_decay=decays, epochs=1,
                      confirm=lambda plan: plans.append(plan) or False, **FAST)
    assert [(plan.configs, plan.to_train) for plan in plans] == [(51, 51)]
    assert not (tmp_path / "sweep").exists()


def test_demo_returns_the_evaluation(tmp_path: Path, tiny_backbone: Path) -> None:
    result = fishseg.demo(str(tmp_path / "demo"), backbone=str(tiny_backbone), classes=2, images_per_class=3,
                          epochs=1, image_size=TINY_IMAGE_SIZE, device="cpu")
    assert result.report == tmp_path / "demo" / "report" / "report.html" and result.report.is_file()
    assert result.metrics == json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert result.n_images == 1 and result.random_init
    assert all(callable(getattr(fishseg, name)) for name in fishseg.api.__all__)


@pytest.fixture
def deterministic_restored() -> Iterator[None]:
    yield
    torch.use_deterministic_algorithms(False)


def test_precision_and_determinism_apply_inside_the_call(toy: Path, tmp_path: Path,
                                                         deterministic_restored: None) -> None:
    with pytest.raises(fishseg.FishsegError, match="precision"):
        fishseg.train(toy, tmp_path / "bad", epochs=1, precision="fp8", **FAST)
    result = fishseg.train(toy, tmp_path / "run", epochs=1, deterministic=True, precision="fp32", **FAST)
    assert result.record.deterministic and result.record.precision == "fp32"


def test_the_benchmark_runs_the_api_in_torchrun_with_keywords_as_json(toy: Path, tmp_path: Path) -> None:
    command = torchrun_call(2, "train", cache=toy, out=tmp_path / "run", epochs=1, batch_size=4, device="cpu")
    assert command[-4:-1] == ["-m", "fishseg.bench.call", "train"] and "--nproc-per-node" in command
    assert json.loads(command[-1]) == {"cache": str(toy), "out": str(tmp_path / "run"), "epochs": 1,
                                       "batch_size": 4, "device": "cpu"}
    call_main(command[-2:])  # what each torchrun process runs
    assert RunFolder(tmp_path / "run").read_record().status == "finished"
    with pytest.raises(ValueError, match="evaluate: not one of extract, train"):
        torchrun_call(2, "evaluate")


def _listing(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def test_demo_refuses_bad_settings_before_writing_anything(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for settings, message in [(dict(out=tmp_path / "notes.txt"), "notes.txt: is a file; `out` is the demo's folder"),
                              (dict(classes=0), "classes 0: expected a whole number from 1 to 4"),
                              (dict(classes=5), "classes 5: expected a whole number from 1 to 4"),
                              (dict(images_per_class=1), "images_per_class 1: expected a whole number >= 2"),
                              (dict(epochs=0), "epochs 0: expected a whole number >= 1")]:
        with pytest.raises(fishseg.FishsegError, match=message):
            fishseg.demo(**{"out": tmp_path / "demo", **settings}, device="cpu")
    assert _listing(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    assert fishseg.config.DEMO_SPECIES == len(SPECIES)  # the CLI's --classes range is the generator's species
    cli = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--classes", "5"])
    assert cli.exit_code == 2 and "1<=x<=4" in cli.output


def test_extract_refuses_a_folder_out_and_an_unknown_compression_up_front(
        tmp_path: Path, kaggle_root: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*_: object) -> None:
        raise AssertionError("refused after the work had started")

    monkeypatch.setattr("fishseg.features.extract.discover_samples", no_work)
    (tmp_path / "run").mkdir()
    for out, options, message in [(tmp_path / "run", dict(overwrite=True),
                                   r"run: is a folder; `out` is the \.h5 file to write, e\.g\. .*cache\.h5"),
                                  (tmp_path / "cache.h5", dict(compression="bogus"),
                                   "compression 'bogus': expected one of none, lzf, gzip")]:
        with pytest.raises(fishseg.FishsegError, match=message):
            fishseg.extract(kaggle_root, out, backbone=str(tiny_backbone), device="cpu", **options)
    assert _listing(tmp_path) == ["run"]


def test_sweep_refuses_an_empty_list_of_values_before_writing(toy: Path, tmp_path: Path) -> None:
    for values in (dict(lr=[]), dict(grid={"lr": ()})):
        with pytest.raises(fishseg.FishsegError, match="^`lr`: an empty list of values; give at least one"):
            fishseg.sweep(toy, tmp_path / "sweep", epochs=1, **values, **FAST)
    assert _listing(tmp_path) == []


def test_probe_json_into_a_folder_names_the_folder(toy: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(fishseg.FishsegError, match=r"out: is a folder; give the path of the file to write"):
        fishseg.probe(toy, json=tmp_path / "out")
    assert _listing(tmp_path) == ["out"]


def test_a_folder_given_as_the_cache_is_called_a_folder(trained: fishseg.TrainResult, tmp_path: Path) -> None:
    run = trained.out
    for call in (lambda: fishseg.train(run, tmp_path / "new", epochs=1, **FAST),
                 lambda: fishseg.evaluate(run, run, out=tmp_path / "report", device="cpu"),
                 lambda: fishseg.probe(run)):
        with pytest.raises(fishseg.FishsegError, match=r"run: is a folder holding a run, not a cache; `cache` is the "
                                                       r"\.h5 file that fishseg extract wrote"):
            call()
    with pytest.raises(fishseg.FishsegError, match=r": is a folder, not a cache;"):
        fishseg.probe(tmp_path)
    assert _listing(tmp_path) == []


def test_wrong_types_are_type_errors_naming_the_keyword(toy: Path, tmp_path: Path) -> None:
    for call, message in [(lambda: fishseg.extract(123, tmp_path / "c.h5"), "`data_root` must be a path"),
                          (lambda: fishseg.train(5, tmp_path / "run"), "`cache` must be a path"),
                          (lambda: fishseg.train(toy, None), r"`out` must be a path \(str or os.PathLike\), not "
                                                             r"NoneType"),
                          (lambda: fishseg.train(toy, tmp_path / "run", config={"epochs": 1}),
                           r"^`config` must be TrainConfig or None, not dict$"),
                          (lambda: fishseg.extract(toy, tmp_path / "c.h5", config=TrainConfig()),
                           "`config` must be ExtractConfig or None, not TrainConfig"),
                          (lambda: fishseg.compare([toy, 7]), "`folders` must be a path"),
                          (lambda: fishseg.probe(toy, json=1), "`json` must be a path")]:
        with pytest.raises(TypeError, match=message):
            call()
    assert _listing(tmp_path) == []


def test_empty_inputs_are_refused_naming_the_keyword(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(fishseg.FishsegError, match="^`folders`: an empty list; give at least one run"):
        fishseg.compare([], out=tmp_path / "board")
    with pytest.raises(fishseg.FishsegError, match="^`inputs`: an empty list; give at least one image or folder"):
        fishseg.predict([], tiny_run, tmp_path / "out", device="cpu")
    assert _listing(tmp_path) == []
