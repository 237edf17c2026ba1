"""ONNX export: every backbone family × every decoder runs in onnxruntime as in torch, with its metadata; refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fishseg.inference.export as export_module
from fishseg.cli import main
from fishseg.config import DECODER_NAMES, TrainConfig
from fishseg.data.images import resized_rgb
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import THRESHOLD
from fishseg.features.extract import run_extraction
from fishseg.formats.runs import RunFolder
from fishseg.inference.export import INPUT_NAME, OUTPUT_NAME, export_onnx
from fishseg.models.backbone import load_backbone, save_random_backbone
from fishseg.models.decoders import segment, uses_image
from fishseg.training.train import run_training
from tests.helpers import TINY_IMAGE_SIZE, TINY_LAYOUT, tiny_extract_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DINOV2_LAYOUT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=8)
FAMILIES = {
    "dinov3_vit": TINY_LAYOUT,
    "dinov2": DINOV2_LAYOUT,
    "dinov2_with_registers": {**DINOV2_LAYOUT, "num_register_tokens": 4},
}
QUICK = {("dinov3_vit", name) for name in DECODER_NAMES} | {("dinov2", "seed-cnn"), ("dinov2_with_registers", "guided")}
COMBINATIONS = [pytest.param(family, decoder, id=f"{family}-{decoder}",
                             marks=() if (family, decoder) in QUICK else pytest.mark.slow)
                for family in FAMILIES for decoder in DECODER_NAMES]  # each family and each decoder quick; all in CI


@pytest.fixture(scope="module")
def family_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 kaggle_root: Path) -> Path:
    """A cache extracted with a tiny random-init backbone of the family (made once a family for the module)."""
    folder = tmp_path_factory.mktemp(request.param)
    backbone = save_random_backbone(folder / "backbone", family=request.param, **FAMILIES[request.param])
    return run_extraction(kaggle_root, folder / "cache.h5", tiny_extract_config(backbone), num_workers=0, device="cpu")


def _train(cache: Path, out: Path, decoder: str) -> Path:
    run_training(cache, out, TrainConfig(decoder=decoder, epochs=1, batch_size=4), device="cpu")
    return out


def _torch_probabilities(run: Path, images: torch.Tensor) -> np.ndarray:
    """N×S×S probabilities as predict computes them: the run's backbone and decoder, the guide resized from the
    photo (here the S×S input) with PIL."""
    record, decoder, meta = RunFolder(run).load()
    config = record.extract_config
    backbone = load_backbone(record.backbone["name"], tuple(config["mean"]), tuple(config["std"]), torch.device("cpu"))
    previews = torch.stack([resized_rgb(Image.fromarray(image.permute(1, 2, 0).numpy()), config["preview_size"])
                            for image in images])
    with torch.inference_mode():
        logits = segment(decoder.eval(), backbone(images, meta.layers), config["image_size"],
                         previews if uses_image(decoder) else None)
    return torch.sigmoid(logits).numpy()


@pytest.mark.parametrize("family_cache, decoder", COMBINATIONS, indirect=["family_cache"])
def test_onnxruntime_gives_torchs_probabilities_and_masks(family_cache: Path, decoder: str, tmp_path: Path) -> None:
    run = _train(family_cache, tmp_path / "run", decoder)
    out = tmp_path / "model.onnx"
    out.write_text("an earlier export")
    result = export_onnx(run, out, overwrite=True)
    assert result.path == out and result.size_bytes == out.stat().st_size > 1000
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "run"]  # no temp file left
    side = TINY_IMAGE_SIZE
    assert (result.image_size, result.input.shape, result.input.dtype) == (side, ("N", 3, side, side), "uint8")
    assert result.output.describe() == f"{OUTPUT_NAME}: N×1×{side}×{side} float32"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        images = torch.from_numpy(rng.integers(0, 256, (batch, 3, side, side), dtype=np.uint8))
        got = session.run(None, {INPUT_NAME: images.numpy()})[0]
        assert got.shape == (batch, 1, side, side) and got.dtype == np.float32
        expected = _torch_probabilities(run, images)
        assert np.abs(got[:, 0] - expected).max() <= 1e-3
        assert ((got[:, 0] > THRESHOLD) == (expected > THRESHOLD)).mean() >= 0.999
    props = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert props == result.metadata
    record = json.loads((run / "run.json").read_text())
    assert json.loads(props["fishseg_train_config"]) == record["train_config"]
    assert json.loads(props["fishseg_extract_config"]) == record["extract_config"]
    assert (props["fishseg_backbone"], props["fishseg_decoder"]) == (record["backbone"]["name"], decoder)
    assert props["fishseg_version"] == record["fishseg_version"]


def test_the_cli_exports_and_says_what_it_wrote(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", "--run", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"model written: {out}" in result.output and "images: N×3×64×64 uint8" in result.output
    assert onnx.load(str(out)).graph.input[0].name == INPUT_NAME
    again = CliRunner().invoke(main, ["export", "--run", str(tiny_run), "--out", str(out)])
    assert again.exit_code == 2 and "model.onnx: exists" in again.output


def test_an_existing_file_or_a_folder_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    with pytest.raises(FishsegError, match=r"model.onnx: exists; pass `overwrite=True` to replace it"):
        export_onnx(tiny_run, out)
    assert out.read_text() == "keep me"
    with pytest.raises(FishsegError, match=r": is a folder; `out` is the .onnx file to write"):
        export_onnx(tiny_run, tmp_path)


def test_an_opset_without_antialiased_resize_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FishsegError, match=r"^opset 17: the exported graph needs ONNX opset 18 or newer"):
        export_onnx(tiny_run, tmp_path / "model.onnx", opset=17)
    assert not (tmp_path / "model.onnx").exists()


def test_another_backbone_is_refused_as_predict_refuses_it(tiny_run: Path, tmp_path: Path) -> None:
    other = save_random_backbone(tmp_path / "other", seed=1, **TINY_LAYOUT)
    with pytest.raises(FishsegError, match=r"same architecture, other weights"):
        export_onnx(tiny_run, tmp_path / "model.onnx", backbone=str(other))
    assert not (tmp_path / "model.onnx").exists()


def test_a_graph_over_two_gigabytes_is_refused(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", 1000)
    with pytest.raises(FishsegError, match=r"GB, over the 2 GB that one .onnx file holds"):
        export_onnx(tiny_run, tmp_path / "model.onnx")


@pytest.mark.parametrize("package", ["onnx", "onnxscript"])
def test_without_the_export_extra_one_line_says_what_to_install(tiny_run: Path, tmp_path: Path, package: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError, as when not installed
    with pytest.raises(FishsegError, match=rf"^export needs {package}, which is not installed: "
                                           rf"pip install fishseg\[export\]$"):
        export_onnx(tiny_run, tmp_path / "model.onnx")
