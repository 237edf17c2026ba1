from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fishseg.cli import Views, main
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import RunFolder
from tests.helpers import REPO, TINY_IMAGE_SIZE


def _script(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / name), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_the_three_scripts_end_to_end(tmp_path: Path, kaggle_root: Path, tiny_backbone: Path) -> None:
    cache, run, report = tmp_path / "cache.h5", tmp_path / "run", tmp_path / "report"
    extract = _script("extract_features.py", "--data-root", kaggle_root, "--out", cache, "--backbone", tiny_backbone,
                      "--image-size", TINY_IMAGE_SIZE, "--preview-size", 32, "--num-workers", 0, "--device", "cpu")
    assert extract.returncode == 0, extract.stderr
    assert f"cache ready: {cache}" in extract.stdout and "RANDOM-INIT" in extract.stderr
    train = _script("train_decoder.py", "--cache", cache, "--out", run, "--epochs", 2, "--device", "cpu")
    assert train.returncode == 0, train.stderr
    assert "best val IoU" in train.stdout and "train loss" in train.stderr  # the epoch table
    evaluate = _script("evaluate.py", "--cache", cache, "--run", run, "--out", report, "--device", "cpu")
    assert evaluate.returncode == 0, evaluate.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert (f"2 validation images: mean IoU {metrics['mean_iou']:.4f}, reference batch IoU "
            f"{metrics['reference_batch_iou']:.4f}") in evaluate.stdout
    assert f"; {metrics['val_with_duplicate_in_train']} with a near-duplicate in training" in evaluate.stdout
    assert "RANDOM-INIT" in evaluate.stdout and metrics["n_images"] == 2  # 20% of 12


def _demo(out: Path, backbone: Path, *options: str, images_per_class: int = 3) -> Result:
    return CliRunner().invoke(main, ["demo", "--out", str(out), "--backbone", str(backbone), "--classes", "2",
                                     "--images-per-class", str(images_per_class), "--epochs", "2",
                                     "--image-size", str(TINY_IMAGE_SIZE), "--device", "cpu", *options])


def _advises_only_demo_options(message: str) -> bool:
    """Every --option a message of `demo` names is one of demo's own."""
    own = {option for parameter in main.commands["demo"].params for option in parameter.opts}
    return set(re.findall(r"--[a-z-]+", message)) <= own


def test_demo_runs_the_whole_job_and_says_the_backbone_is_random(tmp_path: Path, tiny_backbone: Path) -> None:
    result = _demo(tmp_path, tiny_backbone)
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'report' / 'report.html'}" in result.output
    assert "RANDOM-INIT" in result.output
    assert (tmp_path / "cache.h5").is_file() and (tmp_path / "run" / "run.json").is_file()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n_images"] == 1


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_demo_over_an_earlier_demo_is_refused_up_front_and_overwrite_replaces_only_the_demo(
        tmp_path: Path, tiny_backbone: Path) -> None:
    out = tmp_path / "demo"
    assert _demo(out, tiny_backbone).exit_code == 0
    (out / "sweep").mkdir()
    (out / "sweep" / "notes.txt").write_text("mine")
    before = _snapshot(out)
    refused = _demo(out, tiny_backbone, images_per_class=5)
    assert refused.exit_code == 2 and f"{out}: holds an earlier demo (cache.h5, data/" in refused.output
    assert "--overwrite" in refused.output and _advises_only_demo_options(refused.output), refused.output
    assert _snapshot(out) == before
    replaced = _demo(out, tiny_backbone, "--overwrite", images_per_class=5)
    assert replaced.exit_code == 0, replaced.output
    assert len(list((out / "data").rglob("*GT/*.png"))) == 10  # the 6 masks of the first demo are gone
    with FeatureCache(out / "cache.h5") as cache:
        assert len(cache) == 10
    assert RunFolder(out / "run").read_record().cache["images"] == 10
    assert json.loads((out / "report" / "metrics.json").read_text())["n_images"] == 2  # 20% of 10
    assert (out / "sweep" / "notes.txt").read_text() == "mine"


def test_demo_refuses_a_folder_that_holds_something_else_even_with_overwrite(tmp_path: Path,
                                                                            tiny_backbone: Path) -> None:
    (tmp_path / "thesis.tex").write_text("mine")
    for options in ((), ("--overwrite",)):
        result = _demo(tmp_path, tiny_backbone, *options)
        assert result.exit_code == 2 and f"{tmp_path}: holds thesis.tex, not a demo" in result.output
        assert _advises_only_demo_options(result.output) and "--overwrite" not in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("command, option", [
    ("extract", "--data-root"), ("train", "--val-fraction"), ("evaluate", "--run"), ("demo", "--images-per-class"),
    ("predict", "--backbone"), ("probe", "--group-pattern"), ("bench", "--scale")])
def test_help_explains_each_command(command: str, option: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and option in result.output


def test_ci_runs_the_readme_test_command() -> None:
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    test_command = next(line for line in readme.splitlines() if "pytest" in line and line.startswith("python"))
    assert test_command in ci.splitlines()


@pytest.mark.parametrize("args", [
    ["extract", "--data-root", "d", "--out", "c.h5", "--views", ""],
    ["extract", "--data-root", "d", "--out", "c.h5", "--views", "hflip,"],
    ["extract", "--data-root", "d", "--out", "c.h5", "--views", "hflip,,rot90"],
    ["extract", "--data-root", "d", "--out", "c.h5", "--layers", ""],
    ["extract", "--data-root", "d", "--out", "c.h5", "--layers", ",12"],
    ["train", "--cache", "c.h5", "--out", "r", "--layers", "6,"],
    ["sweep", "--cache", "c.h5", "--out", "s", "--decoder", "linear,"],
    ["sweep", "--cache", "c.h5", "--out", "s", "--decoder", ""],
    ["sweep", "--cache", "c.h5", "--out", "s", "--layers", "6,12/"],
    ["sweep", "--cache", "c.h5", "--out", "s", "--layers", "6,/12"],
])
def test_every_list_refuses_an_empty_item_alike(tmp_path: Path, args: list[str]) -> None:
    """--views, --layers and sweep's value lists: an empty value or a stray separator is refused, never skipped."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "an empty value in the list; expected" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("text, views", [("hflip", ("hflip",)), (" hflip , rot90 ", ("hflip", "rot90"))])
def test_views_are_named_ones(text: str, views: tuple[str, ...]) -> None:
    assert Views().convert(text, None, None) == views
