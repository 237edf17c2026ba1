"""The run folder: never lost, resumable to the uninterrupted result, readable at every moment of a crash."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fishseg.cli import as_typed, main
from fishseg.config import TrainConfig
from fishseg.distributed import torchrun_command
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.formats.runs import CHECKPOINT_DIR, HISTORY_JOURNAL, REPORT_DIR, RunFolder, differing_fields
from fishseg.training.train import run_training
from tests.helpers import REPO, interrupt_at_pass, move_a_training_image_to_val, write_toy_cache

RECIPE = TrainConfig(decoder="seed-cnn", epochs=6, batch_size=4, lr=3e-3, seed=2, schedule="cosine", augment="flips")


def _history_table(run_dir: Path) -> dict[str, np.ndarray]:
    """Every number of history.json but the seconds, as one array per table."""
    history = json.loads((run_dir / "history.json").read_text())
    rows = {"epochs": history["epochs"], **history["iterations"]}
    return {name: np.array([[value for key, value in row.items() if key != "seconds"] for row in table])
            for name, table in rows.items()}


def _assert_same_run(resumed: Path, reference: Path) -> None:
    """Equal history (but seconds) and equal best and last weights: the tolerance of the distributed tests."""
    one, two = _history_table(resumed), _history_table(reference)
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-6, err_msg=name)
    record_one, record_two = RunFolder(resumed).read_record(), RunFolder(reference).read_record()
    assert (record_one.status, record_one.best_epoch) == ("finished", record_two.best_epoch)
    for role in ("best", "last"):
        weights_one = load_file(resumed / record_one.checkpoints[role].file)
        weights_two = load_file(reference / record_two.checkpoints[role].file)
        assert weights_one.keys() == weights_two.keys()
        for key in weights_one:
            torch.testing.assert_close(weights_one[key], weights_two[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted run of RECIPE on a toy cache."""
    root = tmp_path_factory.mktemp("reference")
    cache = write_toy_cache(root / "toy.h5", n_images=30)
    run_training(cache, root / "run", RECIPE, device="cpu")
    return cache, root / "run"


@pytest.mark.parametrize("stream", [False, True])
def test_an_interrupted_run_resumes_to_the_uninterrupted_one(reference: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    cache, reference_run = reference
    interrupt_at_pass(monkeypatch, 7)  # epoch 4's training
    with pytest.raises(KeyboardInterrupt):
        run_training(cache, tmp_path / "run", RECIPE, device="cpu", stream=stream)
    record = RunFolder(tmp_path / "run").read_record()
    assert (record.status, record.epochs_done) == ("interrupted", 3)
    assert set(record.checkpoints) == {"best", "last", "resume"}
    monkeypatch.undo()
    resumed = run_training(cache, tmp_path / "run", RECIPE, device="cpu", stream=stream, resume=True)
    assert resumed.status == "finished" and "resume" not in resumed.checkpoints
    assert not list((tmp_path / "run" / CHECKPOINT_DIR).glob("*.resume.safetensors"))  # dropped when finished
    _assert_same_run(tmp_path / "run", reference_run)


def _train_command(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train_decoder.py"), "--cache", str(cache), "--out", str(out), "--decoder",
            RECIPE.decoder, "--epochs", str(KILL_EPOCHS), "--batch-size", str(RECIPE.batch_size), "--lr",
            str(RECIPE.lr), "--seed", str(RECIPE.seed), "--schedule", RECIPE.schedule, "--augment", RECIPE.augment,
            "--device", "cpu", *extra]


KILL_EPOCHS = 14
EPOCH_LINE = re.compile(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)s$", re.MULTILINE)


def _epochs_logged(log: Path) -> list[tuple[int, float]]:
    return [(int(epoch), float(seconds)) for epoch, seconds in EPOCH_LINE.findall(log.read_text())]


def _kill(command: list[str], log: Path, run_dir: Path, moment: str) -> bool:
    """Start training and SIGKILL it at ``moment``; False if the run finished first."""
    checkpoints = run_dir / CHECKPOINT_DIR
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        seen = len(_epochs_logged(log)) if log.exists() else 0
        while process.poll() is None:
            if moment == "writing checkpoints":
                if checkpoints.is_dir() and any(path.name.endswith(".tmp") for path in checkpoints.iterdir()):
                    break
                continue
            logged = _epochs_logged(log)
            if len(logged) > seen:  # an epoch was committed (its line is logged after run.json)
                if moment == "mid-epoch":
                    time.sleep(0.4 * logged[-1][1])
                break
            time.sleep(0.001)
        finished = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.wait()
    return not finished


def _moment_seen(run_dir: Path, moment: str, epochs_before: int) -> bool:
    """Whether the folder shows the kill landed where intended."""
    record = RunFolder(run_dir).read_record()
    files = {path.name for path in (run_dir / CHECKPOINT_DIR).iterdir()}
    leftover_tmp = any(name.endswith(".tmp") for name in files)
    if moment == "writing checkpoints":
        return leftover_tmp
    ahead = f"epoch-{record.epochs_done + 1:04d}.safetensors" in files
    return record.epochs_done > epochs_before and not leftover_tmp and not ahead


def test_sigkill_at_any_moment_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """SIGKILL mid-epoch, between epochs and while checkpoints are written; the folder stays evaluable, and
    --resume ends where an uninterrupted run does."""
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=40, image_size=96, grid=8, dim=256)
    reference = run_training(cache, tmp_path / "reference", dataclasses.replace(RECIPE, epochs=KILL_EPOCHS),
                             device="cpu")
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    pending, seen, attempts = ["between epochs", "mid-epoch", "writing checkpoints"], [], 0
    while pending and attempts < 10:
        attempts += 1
        moment = pending[0]
        before = RunFolder(run_dir).read_record().epochs_done if (run_dir / "run.json").exists() else 0
        extra = ("--resume",) if (run_dir / "run.json").exists() else ()
        if not _kill(_train_command(cache, run_dir, *extra), log, run_dir, moment):
            break
        if not (run_dir / "run.json").exists():
            continue  # killed before the first epoch finished: nothing to evaluate yet
        record = RunFolder(run_dir).read_record()
        assert record.status == "interrupted", moment  # killed: nobody holds the lock
        metrics = run_evaluation(cache, run_dir, tmp_path / f"report-{attempts}", device="cpu", report=False)
        assert metrics["epoch"] == record.best_epoch and metrics["epochs_done"] == record.epochs_done
        if _moment_seen(run_dir, moment, before):
            seen.append(moment)
            pending.pop(0)
    assert seen == ["between epochs", "mid-epoch", "writing checkpoints"], (seen, attempts)
    finished = subprocess.run(_train_command(cache, run_dir, "--resume"), capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert RunFolder(run_dir).read_record().train_config == reference.train_config
    _assert_same_run(run_dir, tmp_path / "reference")
    assert not any(path.name.endswith(".tmp") for path in (run_dir / CHECKPOINT_DIR).iterdir())  # orphans dropped


def _invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result.exit_code, result.output


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_existing_run_is_never_overwritten_without_being_asked(reference: tuple[Path, Path]) -> None:
    cache, run_dir = reference
    before = _snapshot(run_dir)
    status, output = _invoke("train", "--cache", cache, "--out", run_dir, "--device", "cpu")
    assert status == 2
    assert re.fullmatch(rf"Error: {re.escape(str(run_dir))}: already holds a run \(finished, 6 of 6 epochs, best val "
                        rf"IoU \d\.\d{{4}} at epoch \d\); pass --resume to continue it or --overwrite to replace it\n",
                        output)
    assert _snapshot(run_dir) == before


def test_resume_refuses_other_settings_naming_them(reference: tuple[Path, Path]) -> None:
    cache, run_dir = reference
    before = _snapshot(run_dir)
    status, output = _invoke("train", "--cache", cache, "--out", run_dir, "--augment", "none", "--lr", 0.003,
                             "--resume")  # the lr given agrees with the run's; only augment differs
    assert status == 2 and "other settings (augment 'flips' → 'none')" in output, output
    assert _snapshot(run_dir) == before


def test_resume_takes_the_runs_own_settings_and_a_finished_run_stays_as_it_is(reference: tuple[Path, Path]) -> None:
    cache, run_dir = reference
    before = _snapshot(run_dir)
    status, output = _invoke("train", "--cache", cache, "--out", run_dir, "--resume", "--device", "cpu")
    assert status == 0 and output.startswith(f"run finished: {run_dir} (best val IoU"), output
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "holds no run to resume; leave --resume out to start one"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_resume_needs_a_run_and_excludes_overwrite(tmp_path: Path, flags: list[str], message: str) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    status, output = _invoke("train", "--cache", cache, "--out", tmp_path / "run", *flags)
    assert status == 2 and message in output and not (tmp_path / "run").exists(), output


def test_overwrite_replaces_the_run_and_only_its_files(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    run_training(cache, tmp_path / "run", TrainConfig(epochs=2, batch_size=4), device="cpu")
    run_evaluation(cache, tmp_path / "run", device="cpu", report=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    record = run_training(cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4, decoder="linear"),
                          device="cpu", overwrite=True)
    assert (record.train_config.decoder, record.epochs_done) == ("linear", 1)
    assert not (tmp_path / "run" / "report").exists() and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in (tmp_path / "run" / CHECKPOINT_DIR).iterdir()) == ["epoch-0001.safetensors"]


def test_a_run_in_progress_is_refused_to_a_second_trainer(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    with RunFolder(tmp_path / "run").lock():
        with pytest.raises(FishsegError, match="another process is training into this folder"):
            run_training(cache, tmp_path / "run", TrainConfig(epochs=1), device="cpu")


@pytest.fixture
def stopped(reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The cache and a run of RECIPE stopped by Ctrl-C in epoch 3 (2 of 6 epochs done)."""
    cache, _ = reference
    interrupt_at_pass(monkeypatch, 5)  # epoch 3's training
    with pytest.raises(KeyboardInterrupt):
        run_training(cache, tmp_path / "run", RECIPE, device="cpu")
    return cache, tmp_path / "run"


def test_the_report_says_where_an_unfinished_run_stopped(stopped: tuple[Path, Path], tmp_path: Path) -> None:
    cache, _ = stopped
    metrics = run_evaluation(cache, tmp_path / "run", tmp_path / "report", device="cpu")
    assert (metrics["run_status"], metrics["epochs_done"], metrics["epochs_planned"]) == ("interrupted", 2, 6)
    assert "stopped at epoch 2 of 6: interrupted" in (tmp_path / "report" / "report.md").read_text()
    assert "stopped at epoch 2 of 6" in (tmp_path / "report" / "report.html").read_text()


def test_resume_state_is_safetensors_with_every_optimizer_tensor(stopped: tuple[Path, Path], tmp_path: Path) -> None:
    record = RunFolder(tmp_path / "run").read_record()
    state = load_file(tmp_path / "run" / record.checkpoints["resume"].file)  # safetensors: no pickle involved
    parameters = len(list(load_file(tmp_path / "run" / record.checkpoints["last"].file)))
    moments = [name for name in state if name.startswith("optimizer.")]
    assert {name.rsplit(".", 1)[1] for name in moments} == {"step", "exp_avg", "exp_avg_sq"}
    assert len(moments) == 3 * 10 < 3 * parameters  # 10 parameters; batch-norm buffers have no moments
    assert state["generator"].dtype == torch.uint8 and np.any(state["generator"].numpy())


def test_files_fishseg_did_not_write_are_never_deleted(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    run_dir = tmp_path / "run"
    for mine in (run_dir / "checkpoints" / "my_model.pt", run_dir / "report" / "paper_figure.png"):
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text("mine")
    run_training(cache, run_dir, TrainConfig(epochs=3, batch_size=4), device="cpu")
    run_evaluation(cache, run_dir, device="cpu", report=False)
    run_training(cache, run_dir, TrainConfig(epochs=1, batch_size=4), device="cpu", overwrite=True)
    assert (run_dir / "checkpoints" / "my_model.pt").read_text() == "mine"
    assert (run_dir / "report" / "paper_figure.png").read_text() == "mine"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [
        "epoch-0001.safetensors", "my_model.pt"]
    assert not (run_dir / "report" / "metrics.json").exists()  # the old run's scores are not the new run's


def test_checkpoints_get_the_permissions_of_the_other_files(reference: tuple[Path, Path]) -> None:
    _, run_dir = reference
    record = RunFolder(run_dir).read_record()
    modes = {(run_dir / name).stat().st_mode & 0o777 for name in ("run.json", record.checkpoints["best"].file)}
    assert len(modes) == 1, modes


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "run.json: not a fishseg run record"),
    ('{"train_config": {"epochs": null}}', "run.json: not a fishseg run record \\(epochs None"),
    ('{"train_config": ', "run.json: not valid JSON"),
])
def test_a_damaged_record_is_named_and_overwrite_replaces_it(tmp_path: Path, content: str, message: str) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(content)
    for command in (["evaluate", "--cache", cache, "--run", tmp_path / "run"], ["compare", tmp_path / "run"],
                    ["train", "--cache", cache, "--out", tmp_path / "run", "--resume"]):
        status, output = _invoke(*command)
        assert status == 2 and re.search(message, output) and "Traceback" not in output, (command, output)
    status, output = _invoke("train", "--cache", cache, "--out", tmp_path / "run", "--epochs", 1, "--overwrite")
    assert status == 0 and RunFolder(tmp_path / "run").read_record().epochs_done == 1, output


def test_history_is_a_journal_while_running_and_one_json_once_finished(stopped: tuple[Path, Path]) -> None:
    """An unfinished run appends a line an epoch (no whole rewrite); a torn last line and an epoch ahead of
    the record are ignored by readers and cut by a resume; the finished run holds history.json alone."""
    _, run_dir = stopped
    record = RunFolder(run_dir).read_record()
    assert not (run_dir / "history.json").exists()
    lines = (run_dir / HISTORY_JOURNAL).read_text().splitlines()
    assert [json.loads(line)["epoch"]["epoch"] for line in lines] == list(range(1, record.epochs_done + 1))
    ahead = json.loads(lines[-1])
    for row in (ahead["epoch"], *ahead["iterations"]["train"], *ahead["iterations"]["val"]):
        row["epoch"] += 1
    with open(run_dir / HISTORY_JOURNAL, "a") as journal:
        journal.write(json.dumps(ahead) + "\n" + json.dumps(ahead)[:40])  # an uncommitted epoch, a torn line
    history = RunFolder(run_dir).read_history(record)
    assert [row["epoch"] for row in history["epochs"]] == list(range(1, record.epochs_done + 1))
    RunFolder(run_dir).cut_history(record)
    assert list(map(json.loads, (run_dir / HISTORY_JOURNAL).read_text().splitlines())) == list(map(json.loads, lines))
    assert RunFolder(run_dir).read_history(record) == history


def test_a_run_folder_of_an_earlier_version_reads_and_resumes_from_history_json(
        stopped: tuple[Path, Path], reference: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache, reference_run = reference
    record = RunFolder(tmp_path / "run").read_record()
    (tmp_path / "run" / "history.json").write_text(json.dumps(RunFolder(tmp_path / "run").read_history(record)))
    (tmp_path / "run" / HISTORY_JOURNAL).unlink()  # as an earlier fishseg left it
    monkeypatch.undo()
    run_training(cache, tmp_path / "run", RECIPE, device="cpu", resume=True)
    assert not (tmp_path / "run" / HISTORY_JOURNAL).exists()
    _assert_same_run(tmp_path / "run", reference_run)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_stops_training_as_ctrl_c_does_and_the_run_resumes(tmp_path: Path, processes: int) -> None:
    """SIGTERM (kill, a scheduler's time limit; torchrun passes it to every rank) after an epoch: the advice once,
    run.json itself says interrupted (not running), and --resume finishes the run. Alone, fishseg exits 143;
    under torchrun the status is torchrun's."""
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=40, image_size=96, grid=8, dim=256)
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    launcher = torchrun_command(processes) if processes > 1 else [sys.executable]
    with log.open("w") as stderr:
        process = subprocess.Popen([*launcher, *_train_command(cache, run_dir, "--epochs", "6")[1:]],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        while process.poll() is None and not _epochs_logged(log):
            time.sleep(0.001)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
    output = log.read_text()
    assert status == (143 if processes == 1 else 1), output
    assert output.count("Interrupted. Finished epochs are kept: run the same command with --resume to continue.") == 1
    assert "Traceback" not in output or processes > 1  # torchrun's agent prints its own on SIGTERM
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and 1 <= record["epochs_done"] < 6
    assert _invoke("train", "--cache", cache, "--out", run_dir, "--resume", "--device", "cpu")[0] == 0
    assert (RunFolder(run_dir).read_record().status, RunFolder(run_dir).read_record().epochs_done) == ("finished", 6)


@pytest.mark.parametrize("command, left", [
    (["train"], None), (["train", "--cv", "2"], None), (["sweep", "--lr", "1e-3,3e-3"], ["sweep.json"]),
])
def test_a_stop_before_the_first_epoch_keeps_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 command: list[str], left: list[str] | None) -> None:
    """Ctrl-C (SIGTERM stops alike) before any epoch finished: no run is left to --resume, the advice says so, and
    the same command starts again. A sweep keeps its sweep.json, which the same command takes up."""
    cache, out = write_toy_cache(tmp_path / "toy.h5", n_images=12), tmp_path / "out"
    args = [*command, "--cache", cache, "--out", out, "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    interrupt_at_pass(monkeypatch, 1)
    status, output = _invoke(*args)
    assert status == 130 and "\nInterrupted. No epoch had finished: nothing was kept; run the same command" in output
    assert "kept: run the same command" not in output, output
    assert (sorted(path.name for path in out.iterdir()) if out.exists() else None) == left
    monkeypatch.undo()
    assert _invoke(*args)[0] == 0


def _run_copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged, message", [
    ("checkpoints/epoch-0006.safetensors", "epoch-0006.safetensors: does not match the SHA-256 recorded in run.json"),
    ("split.json", "split.json: not the split the run was trained on"),
])
def test_resume_of_a_finished_run_checks_its_files_before_saying_finished(reference: tuple[Path, Path],
                                                                           tmp_path: Path, damaged: str,
                                                                           message: str) -> None:
    cache, run_dir = reference
    run = _run_copy(run_dir, tmp_path)
    assert (run / damaged).is_file()
    if damaged == "split.json":
        move_a_training_image_to_val(run)
    else:
        _flip_last_byte(run / damaged)
    status, output = _invoke("train", "--cache", cache, "--out", run, "--resume", "--device", "cpu")
    assert status == 2 and output.startswith("Error: ") and message in output and output.count("\n") == 1, output


def _edit_record(run: Path, **changes: object) -> None:
    record = json.loads((run / "run.json").read_text())
    record["train_config"].update(changes)
    (run / "run.json").write_text(json.dumps(record))


@pytest.mark.parametrize("evaluated_first", [False, True])
def test_a_record_that_disagrees_with_its_checkpoint_labels_nothing(reference: tuple[Path, Path], tmp_path: Path,
                                                                    evaluated_first: bool) -> None:
    """run.json edited to name another decoder: evaluate (and its report), compare (also from saved scores, the
    leaderboard's labels) and predict's loader refuse it, naming both."""
    cache, run_dir = reference
    run = _run_copy(run_dir, tmp_path)
    if evaluated_first:
        run_evaluation(cache, run, device="cpu", report=False)
    _edit_record(run, decoder="linear")
    message = (f"Error: {run / 'run.json'}: says decoder 'linear' but checkpoints/epoch-\\d{{4}}.safetensors was "
               f"trained with decoder 'seed-cnn'; restore run.json, or train again with --overwrite\n")
    for command in (["evaluate", "--cache", cache, "--run", run, "--out", tmp_path / "report", "--device", "cpu"],
                    ["compare", run, "--out", tmp_path / "board", "--device", "cpu"]):
        status, output = _invoke(*command)
        assert status == 2 and re.fullmatch(message, output), output
    assert not (tmp_path / "report").exists() and not (tmp_path / "board").exists()
    with pytest.raises(FishsegError, match="says decoder 'linear'"):
        RunFolder(run).load()


def test_a_record_states_every_differing_setting_and_older_checkpoints_check_what_they_hold(
        reference: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = reference
    run = _run_copy(run_dir, tmp_path)
    _edit_record(run, lr=0.01, layers=[6, 12])
    with pytest.raises(FishsegError, match=r"says lr 0.01, layers 6,12 but .* was trained with lr 0.003, layers all;"):
        RunFolder(run).read_record()
    _edit_record(run, lr=RECIPE.lr, layers=[])
    assert RunFolder(run).read_record().train_config == RECIPE


def test_an_edited_split_is_refused_and_an_old_record_without_its_digest_is_read(evaluated: tuple[Path, Path, dict],
                                                                                 tmp_path: Path) -> None:
    cache, run_dir, metrics = evaluated
    run = _run_copy(run_dir, tmp_path)
    split = move_a_training_image_to_val(run)
    status, output = _invoke("evaluate", "--cache", cache, "--run", run, "--out", tmp_path / "report",
                             "--device", "cpu")
    assert status == 2 and output == (f"Error: {run / 'split.json'}: not the split the run was trained on (its SHA-256 "
                                      f"differs from the one in run.json); restore it, or train again with "
                                      f"--overwrite\n"), output
    (run / "split.json").write_text(json.dumps(split, indent=4))  # same content, other bytes: still not the file
    with pytest.raises(FishsegError, match="not the split the run was trained on"):
        RunFolder(run).read_split()
    record = json.loads((run / "run.json").read_text())
    assert len(record.pop("split_sha256")) == 64
    (run / "run.json").write_text(json.dumps(record))  # as a fishseg before the digest wrote it: read unchecked
    assert RunFolder(run).read_split() == {name: split[name] for name in ("train", "val")}
    assert run_evaluation(cache, run, tmp_path / "old", device="cpu", report=False)["mean_iou"] == metrics["mean_iou"]


def test_other_settings_are_named_as_typed() -> None:
    assert differing_fields(TrainConfig(layers=(6, 12), augment="flips"), TrainConfig()) == [
        "augment 'flips' → 'none'", "layers 6,12 → all"]


def test_a_resume_that_trains_on_or_an_overwrite_drops_the_old_report(stopped: tuple[Path, Path]) -> None:
    """The report of epoch 2 no longer describes the run once it trains on; a finished run keeps its report."""
    cache, run_dir = stopped
    report = run_dir / REPORT_DIR
    run_evaluation(cache, run_dir, device="cpu")
    assert {path.name for path in report.iterdir()} >= {"report.html", "report.md", "metrics.json"}
    (report / "notes.txt").write_text("mine")
    run_training(cache, run_dir, RECIPE, device="cpu", resume=True)
    assert sorted(path.name for path in report.iterdir()) == ["notes.txt"]
    run_evaluation(cache, run_dir, device="cpu")
    written = {path.name: path.read_bytes() for path in report.iterdir()}
    run_training(cache, run_dir, RECIPE, device="cpu", resume=True)  # finished: nothing to train
    assert {path.name: path.read_bytes() for path in report.iterdir()} == written
    run_training(cache, run_dir, RECIPE, device="cpu", overwrite=True)
    assert sorted(path.name for path in report.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy cache and one folder of each kind, each trained for real (1 epoch)."""
    root = tmp_path_factory.mktemp("kinds")
    cache = write_toy_cache(root / "toy.h5", n_images=12)
    common = ["--cache", cache, "--epochs", 1, "--batch-size", 4, "--device", "cpu"]
    for args in (["train", "--out", root / "run"], ["train", "--out", root / "cv", "--cv", 2],
                 ["sweep", "--out", root / "sweep", "--decoder", "linear"]):
        status, output = _invoke(*args, *common)
        assert status == 0, output
    return {"cache": cache, "run": root / "run", "cv": root / "cv", "sweep": root / "sweep"}


@pytest.mark.parametrize("command, target, holds", [
    (["train"], "cv", "holds a cross-validation (cv.json), not a run"),
    (["train"], "sweep", "holds a sweep (sweep.json), not a run"),
    (["train", "--overwrite"], "cv", "holds a cross-validation (cv.json), not a run"),
    (["train", "--overwrite"], "sweep", "holds a sweep (sweep.json), not a run"),
    (["train", "--cv", "2"], "run", "holds a run (run.json), not a cross-validation"),
    (["train", "--cv", "2", "--overwrite"], "run", "holds a run (run.json), not a cross-validation"),
    (["train", "--cv", "2"], "sweep", "holds a sweep (sweep.json), not a cross-validation"),
    (["sweep"], "run", "holds a run (run.json), not a sweep"),
    (["sweep"], "cv", "holds a cross-validation (cv.json), not a sweep"),
])
def test_a_folder_of_one_kind_refuses_the_commands_of_the_others(kinds: dict[str, Path], command: list[str],
                                                                 target: str, holds: str) -> None:
    before = _snapshot(kinds[target])
    status, output = _invoke(*command, "--cache", kinds["cache"], "--out", kinds[target], "--epochs", 1,
                             "--batch-size", 4, "--device", "cpu")
    assert status == 2 and f"{kinds[target]}: {holds}; use another --out, or remove the folder first" in output, output
    assert _snapshot(kinds[target]) == before


BROKEN_HISTORIES = {  # history.json as a user may leave it → what the one-line refusal says
    "missing": (None, "history.json is missing"),
    "empty object": ("{}", "needs an object with epochs and iterations"),
    "a list": ("[]", "needs an object with epochs and iterations"),
    "epochs not a list": ('{"epochs": 3, "iterations": {"train": [], "val": []}}', "needs an object"),
    "too few epochs": ('{"epochs": [], "iterations": {"train": [], "val": []}}', "holds 0 epochs"),
    "a value as text": ("text", "each row of epochs needs the numbers"),
    "no val iterations": ("no-val", "each row of iterations val needs"),
}


@pytest.mark.parametrize("case", BROKEN_HISTORIES)
def test_a_finished_runs_missing_or_malformed_history_is_refused_by_evaluate_and_compare(
        reference: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    """The report's curves and epoch log come from history.json: never drawn from nothing or from a file of
    another shape (a traceback before), and refused before anything is scored or written."""
    cache, reference_run = reference
    run_dir = Path(shutil.copytree(reference_run, tmp_path / "run", ignore=shutil.ignore_patterns(REPORT_DIR)))
    text, message = BROKEN_HISTORIES[case]
    history = json.loads((run_dir / "history.json").read_text())
    if text == "text":
        history["epochs"][1]["val_iou"] = "0.5"
    elif text == "no-val":
        del history["iterations"]["val"]
    (run_dir / "history.json").unlink()
    if text is not None:
        (run_dir / "history.json").write_text(text if text.startswith(("{", "[")) else json.dumps(history))
    for command in (["evaluate", "--cache", cache, "--run", run_dir, "--device", "cpu"],
                    ["compare", run_dir, "--cache", cache, "--out", tmp_path / "board", "--device", "cpu"]):
        status, output = _invoke(*command)
        assert status == 2 and message in output and "history.json" in output, (command, output)
        assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    assert not (run_dir / REPORT_DIR).exists() and not (tmp_path / "board").exists()


def test_a_resume_refuses_a_journal_whose_lines_are_not_epochs(stopped: tuple[Path, Path]) -> None:
    cache, run_dir = stopped
    with open(run_dir / HISTORY_JOURNAL, "a") as journal:
        journal.write("[1, 2]\n")
    with pytest.raises(FishsegError, match=r"history\.jsonl: not a fishseg history journal"):
        RunFolder(run_dir).cut_history(RunFolder(run_dir).read_record())
    (run_dir / HISTORY_JOURNAL).unlink()
    status, output = _invoke("train", "--cache", cache, "--out", run_dir, "--resume")
    assert status == 2 and "history.json is missing (and no history.jsonl), though run.json records 2" in output


def test_a_run_with_no_finished_epoch_has_an_empty_history(stopped: tuple[Path, Path]) -> None:
    _, run_dir = stopped
    (run_dir / HISTORY_JOURNAL).unlink()
    record = dataclasses.replace(RunFolder(run_dir).read_record(), epochs_done=0)
    assert RunFolder(run_dir).read_history(record) == {"epochs": [], "iterations": {"train": [], "val": []}}


@pytest.mark.parametrize("target, holds", [("run", "a run (run.json)"), ("cv", "a cross-validation (cv.json)"),
                                           ("sweep", "a sweep (sweep.json)")])
def test_predict_and_evaluate_write_into_no_run_cv_or_sweep_folder(kinds: dict[str, Path], tmp_path: Path,
                                                                   target: str, holds: str) -> None:
    """Predictions or a report among a folder's own files would mix kinds: refused before anything is written."""
    before = _snapshot(kinds[target])
    for command, writes in ((["predict", tmp_path / "photos"], "predictions"), (["evaluate", "--cache", kinds["cache"]],
                                                                                 "report")):
        status, output = _invoke(*command, "--run", kinds["run"], "--out", kinds[target], "--device", "cpu")
        assert status == 2 and output.strip() == (f"Error: {kinds[target]}: holds {holds}; write the {writes} into "
                                                  f"another --out"), output
        assert _snapshot(kinds[target]) == before


def test_evaluate_refuses_the_report_folder_of_another_run(kinds: dict[str, Path], tmp_path: Path) -> None:
    other = Path(shutil.copytree(kinds["run"], tmp_path / "other"))
    (other / REPORT_DIR).mkdir(exist_ok=True)
    (other / REPORT_DIR / "metrics.json").write_text("{}")
    status, output = _invoke("evaluate", "--cache", kinds["cache"], "--run", kinds["run"], "--out", other / REPORT_DIR,
                             "--device", "cpu")
    assert status == 2 and f"{other / REPORT_DIR}: the report folder of another run ({other})" in output, output
    assert (other / REPORT_DIR / "metrics.json").read_text() == "{}"
    status, output = _invoke("evaluate", "--cache", kinds["cache"], "--run", other, "--out", other / REPORT_DIR,
                             "--device", "cpu")
    assert status == 0, output


@pytest.mark.parametrize("damage, message", [(lambda path: path.unlink(), "file not found"),
                                             (lambda path: path.write_text('{"train": '), r"not valid JSON \(.*\)")])
def test_a_damaged_split_says_what_to_do(tmp_path: Path, damage: Callable[[Path], object], message: str) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    run_training(cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4), device="cpu")
    damage(tmp_path / "run" / "split.json")
    status, output = _invoke("evaluate", "--cache", cache, "--run", tmp_path / "run", "--device", "cpu")
    assert status == 2 and re.search(rf"run/split.json: {message}; restore it, or train again with --overwrite\n$",
                                     output), output


def test_a_run_whose_training_failed_is_recorded_failed_and_not_resumed(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)  # lr 1e6 diverges in epoch 2: a failed run folder
    run = tmp_path / "run"
    status, output = _invoke("train", "--cache", cache, "--out", run, "--lr", "1e6", "--epochs", "3", "--batch-size",
                             "4", "--device", "cpu")
    assert status == 2 and "loss is NaN or infinite" in output, output
    record = RunFolder(run).read_record()
    assert record.status == "failed" and record.epochs_done >= 1 and record.failure.startswith("loss is NaN")
    for flags in (["--resume"], []):
        status, output = _invoke("train", "--cache", cache, "--out", run, *flags, "--device", "cpu")
        assert status == 2 and output == (f"Error: {run}: its training failed in epoch {record.epochs_done + 1} of 3: "
                                          f"{as_typed(record.failure)}; a resume would repeat that (it continues "
                                          f"the run exactly as it went): train it again with other settings and "
                                          f"--overwrite, or into another --out\n"), output
    with caplog.at_level(logging.WARNING, logger="fishseg.formats.runs"):  # scored or used, it says what it is
        metrics = run_evaluation(cache, run, tmp_path / "report", device="cpu", report=False)
    assert metrics["run_status"] == "failed" and metrics["epoch"] == record.best_epoch
    assert (f"{run}: its training failed in epoch {record.epochs_done + 1} of 3 ({record.failure}); using its best "
            f"checkpoint, of epoch {record.best_epoch}, from before it failed") in caplog.text
    status, output = _invoke("train", "--cache", cache, "--out", run, "--overwrite", "--lr", "1e-3", "--epochs", "3",
                             "--batch-size", "4", "--device", "cpu")
    record = RunFolder(run).read_record()
    assert status == 0 and record.status == "finished" and record.failure == "", output


@pytest.mark.parametrize("target, holds", [("cv", "a cross-validation (cv.json)"), ("sweep", "a sweep (sweep.json)")])
def test_a_run_command_on_a_cv_or_sweep_folder_names_what_it_holds(kinds: dict[str, Path], target: str,
                                                                   holds: str) -> None:
    status, output = _invoke("evaluate", "--cache", kinds["cache"], "--run", kinds[target], "--device", "cpu")
    assert status == 2 and output == (f"Error: {kinds[target]}: not a run folder ({holds}); pass the --out folder of "
                                      f"fishseg train (a fold-k or config folder inside it is one)\n"), output


def _as_written(data: dict) -> str:
    """A record file's text as fishseg has always written it (runtime.write_json)."""
    return json.dumps(data, indent=2) + "\n"


def _old_cv(status: str = "finished") -> dict:
    """cv.json as the previous version wrote it: a plain dict, fold 1 scored."""
    config = TrainConfig(folds=2, layers=(-2, -1))
    scores = {"fold": 1, "n_images": 6, "val_with_duplicate_in_train": 0, "mean_iou": 0.5, "mean_dice": 0.6,
              "mean_boundary_f": 0.4, "pooled_iou": 0.55}
    return {"train_config": dataclasses.asdict(config), "status": status, "folds": [scores, None],
            "summary": {"mean_iou": {"mean": 0.5, "std": 0.0}}}


def _old_sweep(failed: bool = True) -> dict:
    """sweep.json as the previous version wrote it (before failures were recorded: without ``failed``)."""
    configs = [{"name": f"lr={lr}", "train_config": dataclasses.asdict(TrainConfig(lr=lr))} for lr in (0.001, 0.003)]
    return {"fishseg_version": "0.1.0", "cache": {"path": "/data/toy.h5", "fingerprint": "abc", "images": 12},
            "folds": 0, "grid": {"lr": [0.001, 0.003]}, "configs": configs,
            **({"failed": {"lr=0.003": "loss is NaN"}} if failed else {})}


def test_cv_and_sweep_records_read_and_write_back_what_the_previous_version_wrote(tmp_path: Path) -> None:
    """Typed records keep the files byte for byte: read, written back, the text is the same; an older sweep.json
    without failures reads as none failed, and a failure recorded into it adds only that."""
    old, new = RunFolder(tmp_path / "old"), RunFolder(tmp_path / "new")
    old.path.mkdir()
    (old.path / "cv.json").write_text(_as_written(_old_cv()))
    (old.path / "sweep.json").write_text(_as_written(_old_sweep()))
    cv, sweep = old.read_cv(), old.read_sweep()
    assert (cv.train_config.layers, cv.status, cv.scored, cv.summary["mean_iou"]["mean"]) == ((-2, -1), "finished", 1,
                                                                                             0.5)
    assert [entry.config.lr for entry in sweep.configs] == [0.001, 0.003] and sweep.failed == {"lr=0.003": "loss is NaN"}
    new.path.mkdir()
    new.write_cv(cv)
    new.write_sweep(sweep)
    assert (new.path / "cv.json").read_text() == (old.path / "cv.json").read_text()
    assert (new.path / "sweep.json").read_text() == (old.path / "sweep.json").read_text()
    (old.path / "sweep.json").write_text(_as_written(_old_sweep(failed=False)))
    assert old.read_sweep().failed == {}
    old.record_failed_config("lr=0.003", "loss is NaN")
    assert (old.path / "sweep.json").read_text() == _as_written(_old_sweep())
    assert old.config_failures(["lr=0.001", "lr=0.003"]) == {"lr=0.003": "loss is NaN"}


@pytest.mark.parametrize("name, content, message", [
    ("cv.json", [1, 2], "cv.json: not a fishseg cross-validation record (it needs train_config, status, folds)"),
    ("cv.json", {**_old_cv(), "train_config": {"epochs": 0}}, "cv.json: not a fishseg cross-validation record "
                                                              "(train_config: "),
    ("cv.json", {**_old_cv(), "folds": [None]}, "cv.json: not a fishseg cross-validation record (folds needs 2 "
                                                "entries, each an object or null)"),
    ("sweep.json", {"cache": {}}, "sweep.json: not a fishseg sweep record (it needs cache, grid, configs)"),
    ("sweep.json", {**_old_sweep(), "configs": [{"name": "x"}]}, "sweep.json: not a fishseg sweep record (cache, grid "
                                                                "and failed need objects, configs a list"),
    ("sweep.json", {**_old_sweep(), "configs": [{"name": "x", "train_config": {"decoder": "nope"}}]},
     "sweep.json: not a fishseg sweep record (config x: "),
])
def test_a_damaged_cv_or_sweep_record_is_refused_in_one_line_naming_the_file(tmp_path: Path, name: str,
                                                                             content: object, message: str) -> None:
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(FishsegError) as refused:
        RunFolder(tmp_path).read_cv() if name == "cv.json" else RunFolder(tmp_path).read_sweep()
    assert str(refused.value).startswith(f"{tmp_path / message}") and "\n" not in str(refused.value)
    assert str(refused.value).endswith("; restore it, or use `overwrite=True` or another `out`")


def test_a_running_cv_record_reads_interrupted_unless_its_lock_is_held(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "cv")
    folder.path.mkdir()
    (folder.path / "cv.json").write_text(_as_written(_old_cv(status="running")))
    assert folder.read_cv().status == "interrupted"
    with folder.lock():
        assert folder.locked and folder.read_cv().status == "running"


def test_a_run_folder_carries_its_path_and_says_what_it_holds(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path / "out"))
    assert folder.path == tmp_path / "out" and str(folder) == str(tmp_path / "out")
    assert (folder.kind, folder.keeps_a_run, folder.recorded_config(), folder.locked) == (None, False, None, False)
    assert folder.fold(0) == RunFolder(tmp_path / "out" / "fold-1") and folder.runs() == [folder]
    folder.path.mkdir()
    (folder.path / "cv.json").write_text(_as_written(_old_cv()))
    assert (folder.kind, folder.holds_cv, folder.holds_run, folder.holds_sweep) == ("cross-validation", True, False,
                                                                                     False)
    assert folder.runs() == [folder.fold(0), folder.fold(1)] and folder.recorded_config().folds == 2
    assert folder.training_failure() is None
    with pytest.raises(FishsegError, match=re.escape(f"{folder}: holds a cross-validation (cv.json), not a run;")):
        folder.require_kind("run")
    with pytest.raises(FishsegError, match=re.escape(f"{folder}: not a run folder (a cross-validation (cv.json))")):
        folder.read_record()


def test_the_lock_file_goes_when_the_lock_is_released_and_a_stale_one_is_no_lock(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        assert (folder.path / ".lock").is_file() and folder.locked
        with pytest.raises(FishsegError, match=rf"^{re.escape(str(folder.path))}: another process is training"):
            with folder.lock():
                pass
        assert folder.locked
    assert not (folder.path / ".lock").exists() and not folder.locked
    (folder.path / ".lock").write_bytes(b"")  # as a killed trainer leaves it
    assert not folder.locked
    with folder.lock():
        assert folder.locked
    assert not (folder.path / ".lock").exists()


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again_on_the_new_one(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer that opened the file just before the holder released and removed it must not hold a lock that
    excludes nobody: it takes the lock again on the file now at the path."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    stale = folder.path / ".lock"
    stale.write_bytes(b"")
    opened = []
    real_open = open

    def open_then_lose_the_race(path: object, mode: str = "r", *args: object) -> object:
        handle = real_open(path, mode, *args)
        if path == stale and not opened:
            opened.append(os.fstat(handle.fileno()).st_ino)
            stale.unlink()  # the holder releases and removes it...
            stale.write_bytes(b"")  # ...and the next trainer makes it anew
        return handle

    monkeypatch.setattr("builtins.open", open_then_lose_the_race)
    with folder.lock():
        monkeypatch.undo()
        assert folder.locked and os.stat(stale).st_ino != opened[0]
