"""The frozen backbone: load a DINO ViT through transformers and turn images into patch grids.

Supported: DINOv3 ViTs of every size, DINOv2 and DINOv2 with registers (``SUPPORTED``); their token
sequence is CLS, registers, then the patches in row-major order. Models without a patch-token
sequence (DINOv3 ConvNeXt, …) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import (AutoModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                          DINOv3ViTConfig, DINOv3ViTModel, PreTrainedModel)
from transformers.utils import logging as transformers_logging

from fishseg.config import LAST_BLOCK, BackboneInfo, from_json, resolve_layers
from fishseg.errors import FishsegError
from fishseg.runtime import autocast

logger = logging.getLogger(__name__)

RANDOM_INIT_FLAG = "fishseg_random_init"  # set in config.json of checkpoints made by save_random_backbone
VITS16_LAYOUT = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     patch_size=16, num_register_tokens=4)  # the DINOv3 ViT-S/16 architecture
# model_type → the attribute holding the final layer norm, applied to every stored block (as DINOv3's
# get_intermediate_layers(norm=True)); transformers' hidden_states are taken before it.
SUPPORTED = {"dinov3_vit": "norm", "dinov2": "layernorm", "dinov2_with_registers": "layernorm"}
SUPPORTED_NAMES = "DINOv3 ViT (dinov3_vit), DINOv2 (dinov2) and DINOv2 with registers (dinov2_with_registers)"


class Backbone:
    """A frozen ViT mapping uint8 images (B×3×S×S) to float16 patch grids (B×h×w×L·D) of L blocks."""

    def __init__(self, model: PreTrainedModel, info: BackboneInfo, mean: tuple, std: tuple,
                 device: torch.device) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.info = info
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.norm: nn.Module = getattr(self.model, SUPPORTED[info.model_type])

    @property
    def num_blocks(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, layers: Sequence[int] = LAST_BLOCK) -> torch.Tensor:
        """Each of ``layers``' patch tokens after the final norm, concatenated on channels in that order."""
        batch, _, height, width = images.shape
        pixels = (images.to(self.device, non_blocking=True).float() / 255.0 - self.mean) / self.std
        with autocast(self.device, "backbone"):
            states = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states  # [0]: embeddings
            tokens = torch.cat([self.norm(states[block]) for block in resolve_layers(layers, self.num_blocks)], -1)
        patches = tokens[:, 1 + self.info.num_register_tokens:]  # drop CLS and registers
        grid_h, grid_w = height // self.info.patch_size, width // self.info.patch_size
        if patches.shape[1] != grid_h * grid_w:
            raise FishsegError(
                f"backbone {self.info.name}: {patches.shape[1]} patch tokens for a {height}×{width} "
                f"input, expected {grid_h}×{grid_w}; is it a ViT with CLS + register tokens?"
            )
        return patches.reshape(batch, grid_h, grid_w, -1).to(torch.float16)


def load_backbone(name: str, mean: tuple, std: tuple, device: torch.device) -> Backbone:
    """Load a Hub id or a local ``save_pretrained`` directory; ``HF_HUB_OFFLINE`` is honoured.

    Never runs remote code: a directory that ships its own modelling code is refused.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        _refuse_custom_code(local)
    elif looks_like_path(name):
        raise FishsegError(f"backbone {name}: no such folder (a local backbone is a folder saved with "
                           f"save_pretrained)")
    transformers_logging.disable_progress_bar()  # fishseg shows its own progress
    try:
        model = AutoModel.from_pretrained(local if local.is_dir() else name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FishsegError(
            f"cannot load backbone '{name}': {reason} -- a Hub id loads from the Hugging Face Hub (a gated model, "
            f"such as DINOv3, once its licence is accepted there and `hf auth login` run) or, offline, from the "
            f"local Hugging Face cache; or pass as `backbone` a folder saved with save_pretrained"
        ) from None
    return Backbone(model, describe(model, name), mean, std, device)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path: a Hub id is ``name`` or ``org/name``, never starts with
    ``.``, ``/`` or ``~`` and holds no backslash. (``dir/model`` reads as a Hub id: hence absolute paths in caches.)"""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def backbone_reference(name: str) -> str:
    """What a cache records for ``name``: the absolute path of a local folder, so that it still loads from
    another working directory; a Hub id unchanged."""
    local = Path(name).expanduser()
    return os.path.abspath(local) if local.is_dir() else name


def _refuse_custom_code(directory: Path) -> None:
    config_path = directory / "config.json"
    has_auto_map = config_path.is_file() and "auto_map" in json.loads(config_path.read_text())
    if has_auto_map or any(directory.glob("*.py")):
        raise FishsegError(f"{directory}: backbone folder ships custom code; fishseg never runs remote code")


def describe(model: PreTrainedModel, name: str) -> BackboneInfo:
    """The facts about a loaded model that a cache records; a model fishseg cannot read patches from is refused."""
    config = model.config
    if config.model_type not in SUPPORTED:
        raise FishsegError(f"backbone {name}: a {config.model_type} model has no patch-token sequence; fishseg "
                           f"supports {SUPPORTED_NAMES}")
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    gated = getattr(config, "use_gated_mlp", False) or getattr(config, "use_swiglu_ffn", False)
    return BackboneInfo(
        name=name,
        model_type=config.model_type,
        patch_size=int(patch),
        feature_dim=int(config.hidden_size),
        num_register_tokens=int(getattr(config, "num_register_tokens", 0)),
        random_init=bool(getattr(config, RANDOM_INIT_FLAG, False)),
        num_blocks=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        mlp_dim=int(getattr(config, "intermediate_size", 0) or config.hidden_size * config.mlp_ratio),
        mlp="gated" if gated else "plain",
        weights_sha256=weights_digest(model),
    )


def check_backbone(loaded: BackboneInfo, trained: dict[str, Any]) -> None:
    """Refuse a backbone other than the one the run was trained on: another architecture, or the same one with
    other weights. A run whose cache did not record the weights (older caches) is checked as far as it can be,
    with a warning that the weights were not."""
    recorded = from_json(BackboneInfo, json.dumps(trained))
    differing = [f"{name} {value} → {loaded.architecture[name]}" for name, value in recorded.architecture.items()
                 if value is not None and value != loaded.architecture[name]]
    if not differing and recorded.weights_sha256 is not None and recorded.weights_sha256 != loaded.weights_sha256:
        differing = [f"same architecture, other weights (sha256 {recorded.weights_sha256[:8]}… → "
                     f"{loaded.weights_sha256[:8]}…)"]
    if not differing and recorded.random_init != loaded.random_init:
        differing = [f"same architecture, other weights ({_weights_kind(recorded)} → {_weights_kind(loaded)})"]
    if differing:
        raise FishsegError(f"backbone {loaded.name} differs from the one the run was trained on ({recorded.name}): "
                           f"{'; '.join(differing)}; pass as `backbone` the model its cache was extracted with")
    if recorded.weights_sha256 is None:
        logger.warning("backbone %s: the run's cache did not record the weights of %s (made by an older fishseg), "
                       "so only the architecture could be checked", loaded.name, recorded.name)


def _weights_kind(info: BackboneInfo) -> str:
    return "random-init" if info.random_init else "pretrained"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict's tensors in name order (name, dtype, shape, then the bytes): equal weights
    give equal digests whichever folder or Hub id they were loaded from, and on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


RANDOM_FAMILIES = {  # model_type → config and model classes, and the layout ``layout`` overrides
    "dinov3_vit": (DINOv3ViTConfig, DINOv3ViTModel, VITS16_LAYOUT),
    "dinov2": (Dinov2Config, Dinov2Model, {}),
    "dinov2_with_registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel, {}),
}


def save_random_backbone(directory: Path, seed: int = 0, family: str = "dinov3_vit", **layout: int) -> Path:
    """Save a randomly initialised model of ``family`` (a DINOv3 ViT-S/16 unless told otherwise) for demos and
    tests.

    The checkpoint is marked random-init in its config.json, and that mark travels into every
    cache and report made from it, so no one mistakes its numbers for DINOv3's.
    """
    config_class, model_class, defaults = RANDOM_FAMILIES[family]
    config = config_class(**{**defaults, **layout, RANDOM_INIT_FLAG: True})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(directory)
    return directory
