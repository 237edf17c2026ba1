from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fishseg.backbone import backbone_reference, load_backbone, looks_like_path, save_random_backbone
from fishseg.config import IMAGENET_MEAN, IMAGENET_STD
from fishseg.errors import FishsegError

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


def test_missing_hub_model_offline_gives_a_login_hint() -> None:
    with pytest.raises(FishsegError, match=r"cannot load backbone 'facebook/no-such-model'.*hf auth login.*--backbone DIR"):
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

    monkeypatch.setattr("fishseg.backbone.AutoModel.from_pretrained", no_hub)
    with pytest.raises(FishsegError, match=rf"backbone {re.escape(name)}: no such folder"):
        load_backbone(name, IMAGENET_MEAN, IMAGENET_STD, CPU)


def test_local_backbones_are_recorded_as_absolute_paths(tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_backbone.parent)
    assert backbone_reference(tiny_backbone.name) == str(tiny_backbone)
    assert backbone_reference(f"./{tiny_backbone.name}/") == str(tiny_backbone)
    assert backbone_reference("facebook/dinov3-vits16-pretrain-lvd1689m") == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert not looks_like_path("facebook/dinov3-vits16-pretrain-lvd1689m") and looks_like_path(".hidden")
