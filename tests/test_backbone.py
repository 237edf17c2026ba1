from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

from fishseg.config import IMAGENET_MEAN, IMAGENET_STD, BackboneInfo, ExtractConfig, TrainConfig
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import FeatureCache
from fishseg.inference.predict import run_prediction
from fishseg.models.backbone import backbone_reference, load_backbone, looks_like_path, save_random_backbone
from fishseg.training.train import run_training
from tests.helpers import TINY_LAYOUT

CPU = torch.device("cpu")


def test_true_vits16_at_448_gives_a_28x28x384_grid(tmp_path: Path) -> None:
    backbone = load_backbone(str(save_random_backbone(tmp_path / "vits16")), IMAGENET_MEAN, IMAGENET_STD, CPU)
    assert (backbone.info.feature_dim, backbone.info.patch_size, backbone.info.num_register_tokens) == (384, 16, 4)
    assert backbone.info.model_type == "dinov3_vit" and backbone.info.random_init
    grid = backbone(torch.randint(0, 256, (1, 3, 448, 448), dtype=torch.uint8))
    assert grid.shape == (1, 28, 28, 384) and grid.dtype == torch.float16
    assert torch.isfinite(grid).all()


def test_grid_is_the_normalised_patch_tokens_without_cls_and_registers(tiny_backbone: Path) -> None:
    backbone = load_backbone(str(tiny_backbone), IMAGENET_MEAN, IMAGENET_STD, CPU)
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    pixels = (images / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = backbone.model(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 4 * 6
    expected = tokens[:, 5:].reshape(2, 4, 6, 32)  # row-major patch order
    torch.testing.assert_close(backbone(images).float(), expected.half().float())


def test_random_init_mark_is_read_back(tmp_path: Path) -> None:
    directory = save_random_backbone(tmp_path / "b", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    assert json.loads((directory / "config.json").read_text())["fishseg_random_init"] is True


def test_missing_hub_model_offline_gives_advice_true_of_any_hub_id() -> None:
    with pytest.raises(FishsegError, match=r"cannot load backbone 'facebook/no-such-model': .* -- a Hub id loads from "
                                           r"the Hugging Face Hub \(a gated model, such as DINOv3, once its licence is "
                                           r"accepted there and `hf auth login` run\) or, offline, from the local "
                                           r"Hugging Face cache; or pass as `backbone` a folder saved with "
                                           r"save_pretrained$"):
        load_backbone("facebook/no-such-model", IMAGENET_MEAN, IMAGENET_STD, CPU)


def test_backbone_folder_with_custom_code_is_refused(tiny_backbone: Path, tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_backbone / name).read_bytes())
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran remote code')\n")
    with pytest.raises(FishsegError, match="ships custom code"):
        load_backbone(str(folder), IMAGENET_MEAN, IMAGENET_STD, CPU)


@pytest.mark.parametrize("name", ["./vit", "/nowhere/vit", "~/nowhere-fishseg", "runs/a/vit", "a\\vit"])
def test_a_missing_path_stops_at_once_without_the_hub(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("fishseg.models.backbone.AutoModel.from_pretrained", no_hub)
    with pytest.raises(FishsegError, match=rf"backbone {re.escape(name)}: no such folder"):
        load_backbone(name, IMAGENET_MEAN, IMAGENET_STD, CPU)


def test_local_backbones_are_recorded_as_absolute_paths(tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_backbone.parent)
    assert backbone_reference(tiny_backbone.name) == str(tiny_backbone)
    assert backbone_reference(f"./{tiny_backbone.name}/") == str(tiny_backbone)
    assert backbone_reference("facebook/dinov3-vits16-pretrain-lvd1689m") == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert not looks_like_path("facebook/dinov3-vits16-pretrain-lvd1689m") and looks_like_path(".hidden")


def test_every_block_is_stored_after_the_final_norm_and_the_last_equals_last_hidden_state(tmp_path: Path) -> None:
    folder = save_random_backbone(tmp_path / "b", **{**TINY_LAYOUT, "num_hidden_layers": 3})
    backbone = load_backbone(str(folder), IMAGENET_MEAN, IMAGENET_STD, CPU)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pixels = (images / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        output = backbone.model(pixel_values=pixels, output_hidden_states=True)
        normed_first = backbone.model.norm(output.hidden_states[1])
    grids = backbone(images, (1, -1)).float()  # block 1, then the last (3)
    assert grids.shape == (2, 4, 4, 64) and backbone.num_blocks == 3
    torch.testing.assert_close(grids[..., 32:], output.last_hidden_state[:, 5:].reshape(2, 4, 4, 32).half().float())
    torch.testing.assert_close(grids[..., :32], normed_first[:, 5:].reshape(2, 4, 4, 32).half().float())
    raw = output.hidden_states[1][:, 5:].reshape(2, 4, 4, 32)
    assert not torch.allclose(grids[..., :32], raw, atol=1e-2)  # transformers' hidden_states are before the norm
    with pytest.raises(FishsegError, match="layers 4: the backbone has 3 blocks"):
        backbone(images, (4,))


@pytest.mark.parametrize("family, layout, registers", [
    ("dinov2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14), 0),
    ("dinov2_with_registers", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                   patch_size=14, num_register_tokens=4), 4),
])
def test_dinov2_families_read_patch_size_and_registers_from_their_config(tmp_path: Path, family: str, layout: dict,
                                                                         registers: int) -> None:
    folder = save_random_backbone(tmp_path / family, family=family, **layout)
    backbone = load_backbone(str(folder), IMAGENET_MEAN, IMAGENET_STD, CPU)
    assert (backbone.info.model_type, backbone.info.patch_size, backbone.info.num_register_tokens) == (family, 14,
                                                                                                        registers)
    assert (backbone.info.num_blocks, backbone.info.num_heads, backbone.info.mlp_dim, backbone.info.mlp) == (
        2, 2, 64, "plain")
    images = torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        tokens = backbone.model(pixel_values=(images / 255.0 - backbone.mean) / backbone.std).last_hidden_state
    assert tokens.shape[1] == 1 + registers + 16
    torch.testing.assert_close(backbone(images).float(), tokens[:, 1 + registers:].reshape(1, 4, 4, 32).half().float())


def test_a_backbone_digest_is_the_same_for_every_load_of_the_same_weights(tiny_backbone: Path,
                                                                            tmp_path: Path) -> None:
    def info(folder: Path) -> BackboneInfo:
        return load_backbone(str(folder), IMAGENET_MEAN, IMAGENET_STD, CPU).info

    first, copied = info(tiny_backbone), info(shutil.copytree(tiny_backbone, tmp_path / "copy"))
    saved_again = info(save_random_backbone(tmp_path / "again", **TINY_LAYOUT))
    assert first.weights_sha256 == copied.weights_sha256 == saved_again.weights_sha256
    assert len(first.weights_sha256) == 64 and first.architecture == copied.architecture != info(
        save_random_backbone(tmp_path / "deeper", **{**TINY_LAYOUT, "num_hidden_layers": 2})).architecture
    reseeded = info(save_random_backbone(tmp_path / "reseeded", seed=1, **TINY_LAYOUT))
    assert reseeded.architecture == first.architecture and reseeded.weights_sha256 != first.weights_sha256
    assert (first.num_blocks, first.num_heads, first.mlp_dim, first.mlp) == (1, 2, 64, "plain")


def test_a_model_without_a_patch_token_sequence_is_refused_in_one_line(tmp_path: Path) -> None:
    config = DINOv3ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    DINOv3ConvNextModel(config).save_pretrained(tmp_path / "convnext")
    with pytest.raises(FishsegError, match=r"^backbone .*convnext: a dinov3_convnext model has no patch-token sequence; "
                                           r"fishseg supports DINOv3 ViT \(dinov3_vit\), DINOv2 \(dinov2\) and DINOv2 "
                                           r"with registers \(dinov2_with_registers\)$"):
        load_backbone(str(tmp_path / "convnext"), IMAGENET_MEAN, IMAGENET_STD, CPU)


FAMILIES = {  # tiny random-init stand-ins, one per supported path
    "dinov3-vit (S, B, L)": ("dinov3_vit", dict(TINY_LAYOUT, num_hidden_layers=2)),
    "dinov3-vit gated MLP (S+, H+, 7B)": ("dinov3_vit", dict(TINY_LAYOUT, num_hidden_layers=2, use_gated_mlp=True)),
    "dinov2": ("dinov2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14)),
    "dinov2 with registers": ("dinov2_with_registers", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                            mlp_ratio=2, patch_size=14, num_register_tokens=4)),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_extracts_trains_evaluates_and_predicts(name: str, tmp_path: Path, kaggle_root: Path) -> None:
    family, layout = FAMILIES[name]
    folder = save_random_backbone(tmp_path / "backbone", family=family, **layout)
    config = ExtractConfig(backbone=str(folder), image_size=56, preview_size=32, layers=(1, -1))
    cache = run_extraction(kaggle_root, tmp_path / "c.h5", config, num_workers=0, device="cpu")
    run = tmp_path / "run"
    run_training(cache, run, TrainConfig(epochs=1, batch_size=4, layers=(-1,)), device="cpu")
    metrics = run_evaluation(cache, run, device="cpu", report=False)
    predicted = run_prediction(run, [next(kaggle_root.rglob("*.png"))], tmp_path / "pred", num_workers=0, device="cpu")
    grid = 56 // layout["patch_size"]
    with FeatureCache(cache) as opened:
        assert opened.backbone.model_type == family and opened.layers == (1, 2)
        assert opened.features([0]).shape == (1, grid, grid, 64)
    assert metrics["n_images"] == 2 and 0 <= metrics["mean_iou"] <= 1 and predicted.skipped == ()
    assert (tmp_path / "pred" / "predictions.csv").is_file()
