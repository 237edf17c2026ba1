"""Every kind of bad input, through the CLI: one line naming the file, exit status 2, no traceback, no output.

Each case builds its input under ``input/`` and returns the command line, whose output goes to
``out`` beside it; the table ``CASES`` is the whole matrix.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fishseg.data.images
import fishseg.formats.cache
import fishseg.models.backbone
from fishseg.cli import main
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache
from tests.helpers import TINY_IMAGE_SIZE, move_a_training_image_to_val, tiny_extract_config, write_toy_cache

OUT = "out"


def _extract(root: Path, backbone: Path, *extra: str) -> list[str]:
    return ["extract", "--data-root", str(root), "--out", str(root.parent / OUT), "--backbone", str(backbone),
            "--image-size", str(TINY_IMAGE_SIZE), "--preview-size", "32", "--num-workers", "0", "--device", "cpu",
            *extra]


def _generic(root: Path, n: int = 3, size: tuple[int, int] = (40, 30)) -> Path:
    """A valid generic-layout dataset of ``n`` RGB images with masks."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 60 + k, np.uint8)).save(root / "images" / f"{k}.png")
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[5:20, 5:25] = 255
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
    return root


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _jpeg(root: Path) -> Path:
    _generic(root)
    (root / "images" / "0.png").unlink()
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(root / "images" / "0.jpg", quality=90)
    _truncated(root / "images" / "0.jpg")
    return root


def _unreadable(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Permission denied: simulated, since chmod does not stop root, which CI runs as."""
    _generic(root)
    denied, real_open = root / "images" / "1.png", Image.open

    def guarded_open(path: Path, *args: object, **kwargs: object) -> Image.Image:
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fishseg.data.images.Image, "open", guarded_open)
    return root


def _nan_for_image_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backbone returns NaN features for ``1.png`` of ``_generic`` (the image filled with 61)."""
    real = fishseg.models.backbone.Backbone.__call__

    def poisoned(self: fishseg.models.backbone.Backbone, images: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        grid = real(self, images, layers)
        hit = (images[:, 0, 0, 0] == 61).view(-1, 1, 1, 1)
        return torch.where(hit, torch.tensor(float("nan"), dtype=grid.dtype), grid)

    monkeypatch.setattr(fishseg.models.backbone.Backbone, "__call__", poisoned)


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fishseg.formats.cache.np, "savez", no_space)


@dataclasses.dataclass
class Context:
    root: Path  # an empty path where the case builds its input
    backbone: Path
    evaluated: tuple[Path, Path, dict]  # a toy cache, a run trained on it, its metrics
    tiny_run: Path  # a run whose backbone loads, for predict
    monkeypatch: pytest.MonkeyPatch

    def extract(self, data_root: Path, *extra: str) -> list[str]:
        return _extract(data_root, self.backbone, *extra)

    def train(self, cache: Path) -> list[str]:
        return ["train", "--cache", str(cache), "--out", str(self.root.parent / OUT)]

    def evaluate(self, cache: Path, run: Path, out: Path | None = None) -> list[str]:
        return ["evaluate", "--cache", str(cache), "--run", str(run), "--out", str(out or self.root.parent / OUT)]

    def predict(self, *inputs: Path, out: Path | None = None) -> list[str]:
        return ["predict", *map(str, inputs), "--run", str(self.tiny_run), "--out", str(out or self.root.parent / OUT),
                "--num-workers", "0", "--device", "cpu"]

    def poisoned_cache(self, value: float, image: str | None = None, patch: bool = False) -> Path:
        """A copy of the toy cache with ``value`` written into the features of every image, of ``image``, or of
        one patch of ``image``."""
        path = Path(shutil.copy(self.evaluated[0], _mkdir(self.root) / "c.h5"))
        with h5py.File(path, "r+") as file:
            row = list(file["image_ids"].asstr()[:]).index(image) if image else slice(None)
            file["features"][(row, 3, 4) if patch else row] = value
        return path

    def val_id(self) -> str:
        return json.loads((self.evaluated[1] / "split.json").read_text())["val"][0]

    def run_copy(self) -> Path:
        """A copy of the trained run, free to damage."""
        return Path(shutil.copytree(self.evaluated[1], self.root / "run"))


def images_without_masks(ctx: Context) -> list[str]:
    shutil.rmtree(_generic(ctx.root) / "masks")
    return ctx.extract(ctx.root)


def unpaired_files(ctx: Context) -> list[str]:
    (_generic(ctx.root) / "masks" / "2.png").unlink()
    return ctx.extract(ctx.root)


def mask_of_another_size(ctx: Context) -> list[str]:
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(_generic(ctx.root) / "masks" / "1.png")
    return ctx.extract(ctx.root)


def truncated_png(ctx: Context) -> list[str]:
    _truncated(_generic(ctx.root) / "images" / "1.png")
    return ctx.extract(ctx.root)


def not_an_image(ctx: Context) -> list[str]:
    (_generic(ctx.root) / "images" / "2.png").write_text("hello")
    return ctx.extract(ctx.root)


def bad_image_size(ctx: Context) -> list[str]:
    args = ctx.extract(_generic(ctx.root))
    args[args.index("--image-size") + 1] = "62"  # nearer 64 than 56
    return args


def disk_full(ctx: Context) -> list[str]:
    _disk_full(ctx.monkeypatch)
    return ctx.extract(_generic(ctx.root))


def truncated_hdf5(ctx: Context) -> list[str]:
    ctx.root.mkdir()
    (ctx.root / "c.h5").write_bytes(ctx.evaluated[0].read_bytes()[:3000])
    return ctx.train(ctx.root / "c.h5")


def foreign_hdf5(ctx: Context) -> list[str]:
    ctx.root.mkdir()
    h5py.File(ctx.root / "c.h5", "w").close()
    return ctx.train(ctx.root / "c.h5")


def interrupted_cache(ctx: Context) -> list[str]:
    store = fishseg.formats.cache.PartStore.open(ctx.root / "c.h5", {"batch_size": 2, "image_ids": ["a", "b", "c"]})
    store.write(0, 2, features=np.zeros((2, 1)))
    return ctx.train(ctx.root / "c.h5")


def cache_of_another_image_size(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    return ctx.evaluate(write_toy_cache(ctx.root / "c.h5", 20, image_size=64), run)


def run_from_another_cache(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    return ctx.evaluate(write_toy_cache(ctx.root / "c.h5", 12), run)


def record_naming_another_decoder(ctx: Context) -> Path:
    run = ctx.run_copy()
    record = json.loads((run / "run.json").read_text())
    record["train_config"]["decoder"] = "linear"
    (run / "run.json").write_text(json.dumps(record))
    return run


def edited_split(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    move_a_training_image_to_val(run)
    return ctx.evaluate(ctx.evaluated[0], run)


def tampered_checkpoint(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    best = run / json.loads((run / "run.json").read_text())["checkpoints"]["best"]["file"]
    data = bytearray(best.read_bytes())
    data[-1] ^= 0xFF  # one weight bit: safetensors itself would load it without complaint
    best.write_bytes(bytes(data))
    return ctx.evaluate(ctx.evaluated[0], run)


def a_file(ctx: Context) -> Path:
    """A plain file where a folder would be needed."""
    _mkdir(ctx.root)
    (ctx.root / "file").write_text("not a folder")
    return ctx.root / "file"


def demo_with_bad_image_size(ctx: Context) -> list[str]:
    return ["demo", "--out", str(ctx.root.parent / OUT), "--backbone", str(ctx.backbone), "--classes", "1",
            "--images-per-class", "2", "--epochs", "1", "--image-size", "60", "--device", "cpu"]


def predict_one_corrupt(ctx: Context) -> list[str]:
    _truncated(_generic(ctx.root) / "images" / "1.png")
    return ctx.predict(ctx.root / "images")


CASES: list[tuple[str, Callable[[Context], list[str]], str]] = [
    ("missing data root", lambda ctx: ctx.extract(ctx.root / "nowhere"), r"nowhere: data root not found"),
    ("empty data root", lambda ctx: ctx.extract(_mkdir(ctx.root)), r"input: no dataset found"),
    ("images but no masks", images_without_masks, r"masks: mask folder missing for the 3 images"),
    ("unpaired files", unpaired_files, r"1 file without a partner.*images/2.png"),
    ("mask of another size", mask_of_another_size, r"masks/1.png: mask is 7×7 but its image is 40×30"),
    ("truncated PNG", truncated_png, r"images/1.png: cannot read image .*--skip-bad"),
    ("truncated JPEG", lambda ctx: ctx.extract(_jpeg(ctx.root)), r"images/0.jpg: cannot read image"),
    ("not an image", not_an_image, r"images/2.png: cannot read image"),
    ("unreadable file", lambda ctx: ctx.extract(_unreadable(ctx.root, ctx.monkeypatch)),
     r"images/1.png: cannot read image \(\[Errno 13\] Permission denied"),
    ("image size not a multiple of the patch", bad_image_size,
     r"--image-size 62: not a multiple of the backbone's patch size 8; try 64$"),
    ("no space left while writing", disk_full, r"out.parts/00000000-00000003.npz: cannot write \(No space left"),
    ("truncated HDF5 as cache", truncated_hdf5, r"c.h5: not a readable HDF5 file"),
    ("foreign HDF5 as cache", foreign_hdf5, r"c.h5: HDF5 file is not a fishseg cache"),
    ("interrupted cache", interrupted_cache,
     r"c.h5: extraction is incomplete \(2 of 3 images done\); run the same extract command again to resume"),
    ("cache of another image size", cache_of_another_image_size,
     r"run.json: made from cache \w+ \(backbone toy, image_size 32\) but .*c.h5 is cache \w+ \(backbone toy, "
     r"image_size 64\)"),
    ("run from another cache", run_from_another_cache, r"run.json: made from cache .*pass the cache it was trained on"),
    ("not a run folder", lambda ctx: ctx.evaluate(ctx.evaluated[0], _mkdir(ctx.root)),
     r"input: not a run folder \(no run.json\); pass the --out folder of fishseg train"),
    ("run.json naming another decoder", lambda ctx: ctx.evaluate(ctx.evaluated[0], record_naming_another_decoder(ctx)),
     r"run/run.json: says decoder 'linear' but checkpoints/epoch-\d{4}.safetensors was trained with decoder "
     r"'seed-cnn'; restore run.json, or train again with --overwrite$"),
    ("compare a run whose run.json names another decoder",
     lambda ctx: ["compare", str(record_naming_another_decoder(ctx)), "--out", str(ctx.root.parent / OUT)],
     r"run/run.json: says decoder 'linear' but checkpoints/epoch-\d{4}.safetensors was trained with decoder"),
    ("edited split.json", edited_split,
     r"run/split.json: not the split the run was trained on \(its SHA-256 differs from the one in run.json\); "
     r"restore it, or train again with --overwrite$"),
    ("tampered checkpoint", tampered_checkpoint, r"epoch-\d{4}.safetensors: does not match the SHA-256 recorded in run.json"),
    ("NaN in every feature", lambda ctx: ctx.train(ctx.poisoned_cache(float("nan"))),
     r"c.h5: features of 20 images hold NaN or inf \(class0/000.png, .* and 15 more\); extract again"),
    ("inf in one training image", lambda ctx: ctx.train(ctx.poisoned_cache(float("inf"), "class1/005.png")),
     r"c.h5: features of 1 image hold NaN or inf \(class1/005.png\); extract again"),
    ("NaN in one patch of one val image",
     lambda ctx: ctx.evaluate(ctx.poisoned_cache(float("nan"), ctx.val_id(), patch=True), ctx.evaluated[1]),
     r"c.h5: features of 1 image hold NaN or inf \(class\d/\d{3}.png\); extract again"),
    ("NaN features in the species probe",
     lambda ctx: ["probe", "--cache", str(ctx.poisoned_cache(float("-inf"), "class0/000.png"))],
     r"features of 1 image hold NaN or inf \(class0/000.png\)"),
    ("backbone gives NaN for one image",
     lambda ctx: (_nan_for_image_1(ctx.monkeypatch), ctx.extract(_generic(ctx.root)))[1],
     r"images/1.png: the backbone gave NaN or inf features for this image \(pass --skip-bad"),
    ("evaluate --out under /proc", lambda ctx: ctx.evaluate(*ctx.evaluated[:2], Path("/proc/fishseg-out/report")),
     r"/proc/fishseg-out/report: cannot create the output folder: No such file or directory at /proc/fishseg-out"),
    ("evaluate --out below a file", lambda ctx: ctx.evaluate(*ctx.evaluated[:2], a_file(ctx) / "report"),
     r"file/report: cannot create the output folder: .*input/file is a file, not a folder; choose another --out"),
    ("predict --out below a file", lambda ctx: ctx.predict(_generic(ctx.root) / "images", out=a_file(ctx) / "p"),
     r"file/p: cannot create the output folder: .*input/file is a file, not a folder"),
    ("extract --out under /proc", lambda ctx: [*ctx.extract(_generic(ctx.root)), "--out", "/proc/fishseg-out/c.h5"],
     r"/proc/fishseg-out: cannot create the output folder: No such file or directory"),
    ("extract --out below a file", lambda ctx: [*ctx.extract(_generic(ctx.root)), "--out", str(a_file(ctx) / "c.h5")],
     r"input/file: cannot create the output folder: .*input/file is a file, not a folder"),
    ("demo with an image size the patch does not divide", demo_with_bad_image_size,
     r"--image-size 60: not a multiple of the backbone's patch size 8; try 56 or 64"),
    ("backbone path that does not exist", lambda ctx: [*ctx.extract(_generic(ctx.root)), "--backbone", "./nowhere/vit"],
     r"backbone ./nowhere/vit: no such folder"),
    ("predict with one corrupt image", predict_one_corrupt, r"images/1.png: cannot read image .*--skip-bad"),
    ("train --out below a file", lambda ctx: [*ctx.train(ctx.evaluated[0]), "--out", str(a_file(ctx) / "run")],
     r"file/run: cannot create the output folder: .*input/file is a file, not a folder"),
    ("sweep --out below a file", lambda ctx: ["sweep", "--cache", str(ctx.evaluated[0]), "--out",
                                              str(a_file(ctx) / "sweep"), "--epochs", "1"],
     r"file/sweep: cannot create the output folder: .*input/file is a file, not a folder"),
    ("train --lr nan", lambda ctx: [*ctx.train(ctx.evaluated[0]), "--lr", "nan"], r"'nan' is not a finite number"),
    ("train --lr -1", lambda ctx: [*ctx.train(ctx.evaluated[0]), "--lr", "-1"], r"'-1' is not in the range x>0\.$"),
    ("train --val-fraction 1e0", lambda ctx: [*ctx.train(ctx.evaluated[0]), "--val-fraction", "1e0"],
     r"'1e0' is not in the range 0<x<1\.$"),
    ("train --weight-decay inf", lambda ctx: [*ctx.train(ctx.evaluated[0]), "--weight-decay", "inf"],
     r"'inf' is not a finite number"),
    ("train --cv 1", lambda ctx: [*ctx.train(ctx.evaluated[0]), "--cv", "1"],
     r"--cv.*: K-fold cross-validation needs K >= 2 \(0: one train/val split\)"),
    ("streamed training on NaN features",
     lambda ctx: [*ctx.train(ctx.poisoned_cache(float("nan"), ctx.val_id())), "--stream", "--device", "cpu"],
     r"c.h5: features of 1 image hold NaN or inf \(class\d/\d{3}.png\); extract again"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("case, build, message", CASES, ids=[case for case, _, _ in CASES])
def test_bad_input_gives_one_line_exit_2_and_no_output(case: str, build: Callable[[Context], list[str]],
                                                        message: str, tmp_path: Path, tiny_backbone: Path,
                                                        evaluated: tuple[Path, Path, dict], tiny_run: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Context(tmp_path / "input", tiny_backbone, evaluated, tiny_run, monkeypatch)
    result = CliRunner().invoke(main, build(ctx))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]  # progress bars may come before
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert errors[0].startswith("Error: ") and "Traceback" not in result.output
    assert re.search(message, errors[0]), errors[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "input") == [], "output left behind"


@pytest.mark.parametrize("array", [
    np.full((30, 40), 40000, np.uint16),  # 16-bit grayscale
    np.full((30, 40), 128, np.uint8),  # 8-bit grayscale
    np.full((30, 40, 4), 128, np.uint8),  # RGBA
], ids=["16-bit", "grayscale", "RGBA"])
def test_unusual_image_modes_extract_fine(array: np.ndarray, tmp_path: Path, tiny_backbone: Path) -> None:
    root = _generic(tmp_path / "input")
    for k in range(3):
        Image.fromarray(array).save(root / "images" / f"{k}.png")
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "images" / "0.png")  # one palette image among them
    result = CliRunner().invoke(main, _extract(root, tiny_backbone))
    assert result.exit_code == 0, result.output
    assert (tmp_path / OUT).is_file()


def test_skip_bad_leaves_out_an_image_whose_features_are_not_finite(tmp_path: Path, tiny_backbone: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_for_image_1(monkeypatch)
    result = CliRunner().invoke(main, _extract(_generic(tmp_path / "input"), tiny_backbone, "--skip-bad"))
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / OUT) as cache:
        assert cache.image_ids == ["images/0.png", "images/2.png"]
        assert [image_id for image_id, _ in cache.skipped] == ["images/1.png"]
        assert "the backbone gave NaN or inf features" in cache.skipped[0][1]


def test_extract_never_touches_a_file_that_is_not_a_cache_unless_told(tmp_path: Path, tiny_backbone: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    root, out = _generic(tmp_path / "input"), tmp_path / OUT
    out.write_text("my notes")
    result = CliRunner().invoke(main, _extract(root, tiny_backbone))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"Error: {out}: exists and is not a fishseg cache, so fishseg extract will not touch it; choose "
            f"another --out, or pass --overwrite to replace it") in result.output
    assert out.read_text() == "my notes"
    with caplog.at_level(logging.WARNING):
        run_extraction(root, out, tiny_extract_config(tiny_backbone), num_workers=0, device="cpu", overwrite=True)
    assert f"{out} is not a fishseg cache; `overwrite=True` replaces it" in caplog.text
    with FeatureCache(out) as cache:
        assert len(cache) == 3


def test_predict_skip_bad_predicts_the_good_images_and_lists_the_bad(tmp_path: Path, tiny_run: Path) -> None:
    root = _generic(tmp_path / "input")
    _truncated(root / "images" / "1.png")
    out = tmp_path / OUT
    result = CliRunner().invoke(main, ["predict", str(root / "images"), "--run", str(tiny_run), "--out", str(out),
                                       "--num-workers", "0", "--device", "cpu", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert re.search(r"skipped: .*images/1.png: cannot read image", result.output)
    assert "predictions written" in result.output and "(1 image skipped)" in result.output
    rows = {Path(row["file"]).name: row for row in csv.DictReader((out / "predictions.csv").open())}
    assert list(rows) == ["0.png", "1.png", "2.png"]
    assert rows["1.png"]["mask"] == "" and "cannot read image" in rows["1.png"]["error"]
    assert rows["0.png"]["error"] == "" and rows["2.png"]["width"] == "40"
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["0.png", "2.png"]


def _sideways_jpeg(root: Path) -> np.ndarray:
    """A 40×30 photo stored as 30×40 with EXIF orientation 6 (rotate 90° clockwise to view), an upright 40×30
    mask beside it; returns the upright photo."""
    _generic(root, n=3)
    upright = np.zeros((30, 40, 3), np.uint8)
    upright[:, 20:] = 250  # right half bright: tells the orientation apart
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "images" / "0.png").unlink()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(root / "images" / "0.jpg", exif=exif,
                                                                         quality=95)
    return upright


def test_exif_orientation_is_applied_to_images_in_extract_and_predict(tmp_path: Path, tiny_backbone: Path,
                                                                       tiny_run: Path) -> None:
    upright = _sideways_jpeg(tmp_path / "input")
    result = CliRunner().invoke(main, _extract(tmp_path / "input", tiny_backbone))
    assert result.exit_code == 0, result.output  # the upright mask is accepted: the image is upright too
    with FeatureCache(tmp_path / OUT) as cache:
        preview = cache.previews([cache.image_ids.index("images/0.jpg")])[0].mean(axis=2)
    assert preview[:, :12].mean() < 40 and preview[:, -12:].mean() > 210  # dark left, bright right: upright
    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "input" / "images" / "0.jpg"), "--run", str(tiny_run),
                                       "--out", str(out), "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "masks" / "0.png").size == Image.open(out / "overlays" / "0.png").size == (40, 30)
    assert np.abs(np.asarray(Image.open(out / "overlays" / "0.png"), float)[:, 30:] - upright[:, 30:]).mean() < 150


def test_exif_orientation_is_applied_to_masks(tmp_path: Path) -> None:
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "m.jpg", exif=exif, quality=100)
    read = np.asarray(fishseg.data.images.read_mask(tmp_path / "m.jpg"))
    assert read.shape == (30, 40) and read[:, :8].all() and not read[:, 12:].any()
