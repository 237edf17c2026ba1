"""Every kind of bad input, through the CLI: one line naming the file, exit status 2, no traceback, no output.

Each case builds its input under ``input/`` and returns the command line, whose output goes to
``out`` beside it; the table ``CASES`` is the whole matrix.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fishseg.cache
import fishseg.data
from fishseg.cli import main
from tests.helpers import TINY_IMAGE_SIZE, write_toy_cache

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

    monkeypatch.setattr(fishseg.data.Image, "open", guarded_open)
    return root


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fishseg.cache.np, "savez", no_space)


@dataclasses.dataclass
class Context:
    root: Path  # an empty path where the case builds its input
    backbone: Path
    evaluated: tuple[Path, Path, dict]  # a toy cache, a run trained on it, its metrics
    monkeypatch: pytest.MonkeyPatch

    def extract(self, data_root: Path, *extra: str) -> list[str]:
        return _extract(data_root, self.backbone, *extra)

    def train(self, cache: Path) -> list[str]:
        return ["train", "--cache", str(cache), "--out", str(self.root.parent / OUT)]

    def evaluate(self, cache: Path, run: Path) -> list[str]:
        return ["evaluate", "--cache", str(cache), "--run", str(run), "--out", str(self.root.parent / OUT)]

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
    args[args.index("--image-size") + 1] = "60"
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
    fishseg.cache.PartStore.open(ctx.root / "c.h5", {"batch_size": 2, "image_ids": ["a"]})
    return ctx.train(ctx.root / "c.h5")


def cache_of_another_image_size(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    return ctx.evaluate(write_toy_cache(ctx.root / "c.h5", 20, image_size=64), run)


def run_from_another_cache(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    return ctx.evaluate(write_toy_cache(ctx.root / "c.h5", 12), run)


def tampered_checkpoint(ctx: Context) -> list[str]:
    run = ctx.run_copy()
    best = run / json.loads((run / "run.json").read_text())["checkpoints"]["best"]["file"]
    data = bytearray(best.read_bytes())
    data[-1] ^= 0xFF  # one weight bit: safetensors itself would load it without complaint
    best.write_bytes(bytes(data))
    return ctx.evaluate(ctx.evaluated[0], run)


CASES: list[tuple[str, Callable[[Context], list[str]], str]] = [
    ("missing data root", lambda ctx: ctx.extract(ctx.root / "nowhere"), r"nowhere: data root not found"),
    ("empty data root", lambda ctx: ctx.extract(_mkdir(ctx.root)), r"input: no dataset found"),
    ("images but no masks", images_without_masks, r"masks: mask folder missing for the 3 images"),
    ("unpaired files", unpaired_files, r"1 files without a partner.*images/2.png"),
    ("mask of another size", mask_of_another_size, r"masks/1.png: mask is 7×7 but its image is 40×30"),
    ("truncated PNG", truncated_png, r"images/1.png: cannot read image .*--skip-bad"),
    ("truncated JPEG", lambda ctx: ctx.extract(_jpeg(ctx.root)), r"images/0.jpg: cannot read image"),
    ("not an image", not_an_image, r"images/2.png: cannot read image"),
    ("unreadable file", lambda ctx: ctx.extract(_unreadable(ctx.root, ctx.monkeypatch)),
     r"images/1.png: cannot read image \(\[Errno 13\] Permission denied"),
    ("image size not a multiple of the patch", bad_image_size,
     r"--image-size 60: not divisible by the backbone's patch size 8; try 56"),
    ("no space left while writing", disk_full, r"out.parts/00000000-00000003.npz: cannot write \(No space left"),
    ("truncated HDF5 as cache", truncated_hdf5, r"c.h5: not a readable HDF5 file"),
    ("foreign HDF5 as cache", foreign_hdf5, r"c.h5: HDF5 file is not a fishseg cache"),
    ("interrupted cache", interrupted_cache,
     r"c.h5: extraction is incomplete \(0 of 1 images done\); run the same extract command again to resume"),
    ("cache of another image size", cache_of_another_image_size,
     r"run.json: made from cache \w+ \(backbone toy, image_size 32\) but .*c.h5 is cache \w+ \(backbone toy, "
     r"image_size 64\)"),
    ("run from another cache", run_from_another_cache, r"run.json: made from cache .*pass the cache it was trained on"),
    ("tampered checkpoint", tampered_checkpoint, r"epoch-\d{4}.safetensors: does not match the SHA-256 recorded in run.json"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("case, build, message", CASES, ids=[case for case, _, _ in CASES])
def test_bad_input_gives_one_line_exit_2_and_no_output(case: str, build: Callable[[Context], list[str]],
                                                        message: str, tmp_path: Path, tiny_backbone: Path,
                                                        evaluated: tuple[Path, Path, dict],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Context(tmp_path / "input", tiny_backbone, evaluated, monkeypatch)
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
