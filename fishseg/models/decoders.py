"""Decoders over cached patch grids, their registry, and the checkpoint format.

A decoder maps features B×D×h×w to logits B×K×h'×w' (the grid, or finer; K = 1 for binary masks, one
channel per class otherwise); ``segment`` upsamples them to the mask size. A decoder whose class sets ``uses_image = True`` also takes the photo as a
guide, float RGB B×3×P×P in [0, 1] (the cache's previews, or the input photo resized alike in
``predict``); every other decoder is called with the features alone.
A checkpoint is one safetensors file: the weights plus JSON metadata from which the decoder is
rebuilt, so loading it never unpickles anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from fishseg.version import __version__
from fishseg.classes import Classes
from fishseg.config import LAST_BLOCK
from fishseg.errors import FishsegError

CHECKPOINT_KEY = "fishseg"  # safetensors metadata entry holding the JSON description


def _bilinear_weights(source: int, target: int, device: torch.device) -> torch.Tensor:
    """The target×source matrix of bilinear interpolation with ``align_corners=False``, as F.interpolate
    computes it for an explicit size: source position (i + 0.5)·source/target − 0.5, clamped at 0."""
    position = ((torch.arange(target, dtype=torch.float64) + 0.5) * (source / target) - 0.5).clamp(min=0)
    low = position.floor().long().clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    weight = position - low
    matrix = torch.zeros(target, source, dtype=torch.float64)
    rows = torch.arange(target)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix.float().to(device)


def bilinear_by_matmul(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of B×C×H×W to ``size`` as two matrix products, whose backward is deterministic
    (CUDA's upsample_bilinear2d backward adds with atomics, in a varying order)."""
    rows = _bilinear_weights(tensor.shape[-2], size[0], tensor.device)
    columns = _bilinear_weights(tensor.shape[-1], size[1], tensor.device)
    return rows.to(tensor.dtype) @ tensor @ columns.T.to(tensor.dtype)


def upsample(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``); by matrix products on CUDA under deterministic algorithms
    (``train --deterministic``), by F.interpolate everywhere else, so CPU results stay as they were."""
    if tensor.is_cuda and torch.are_deterministic_algorithms_enabled():
        return bilinear_by_matmul(tensor, size)
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


class SeedCNN(nn.Module):
    """The reference decoder: Conv3×3→128+BN+ReLU, Conv3×3→64+BN+ReLU, Conv1×1→1."""

    def __init__(self, in_dim: int, channels: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_dim, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class LinearProbe(nn.Module):
    """A 1×1 convolution: the standard frozen-feature baseline (one logit per patch, no context)."""

    def __init__(self, in_dim: int, channels: int = 1) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_dim, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class ProgressiveDecoder(nn.Module):
    """Upsamples in learned ×2 steps (28→56→112→224→448 for ViT-S/16 at 448), narrowing as it goes,
    so that boundaries are drawn at full resolution instead of interpolated from the patch grid."""

    WIDTHS = (96, 64, 32, 16, 8)

    def __init__(self, in_dim: int, channels: int = 1) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_dim, self.WIDTHS[0], 1), nn.BatchNorm2d(self.WIDTHS[0]),
                                    nn.ReLU(inplace=True))
        self.up = nn.Sequential(*(_up_block(a, b) for a, b in zip(self.WIDTHS, self.WIDTHS[1:])))
        self.head = nn.Conv2d(self.WIDTHS[-1], channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.reduce(features)))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class GuidedDecoder(nn.Module):
    """The seed-cnn trunk's coarse logits, refined in three ×2 steps (28→56→112→224 for ViT-S/16 at 448)
    that each see the photo resized to the step's resolution: the grid says what is fish, the photo
    where its edge is. The refinement is added to the bilinearly upsampled coarse logits, so it only
    has to learn the correction near edges."""

    uses_image = True
    WIDTHS = (64, 32, 16, 16)  # trunk output, then each ×2 step
    GUIDE_CHANNELS = 16  # image features concatenated at each step

    def __init__(self, in_dim: int, channels: int = 1) -> None:
        super().__init__()
        self.trunk = nn.Sequential(_conv_block(in_dim, 128), _conv_block(128, self.WIDTHS[0]))
        self.coarse = nn.Conv2d(self.WIDTHS[0], channels, 1)
        self.guides = nn.ModuleList(_conv_block(3, self.GUIDE_CHANNELS) for _ in self.WIDTHS[1:])
        self.steps = nn.ModuleList(_conv_block(a + self.GUIDE_CHANNELS + channels, b)
                                   for a, b in zip(self.WIDTHS, self.WIDTHS[1:]))
        self.head = nn.Conv2d(self.WIDTHS[-1], channels, 1)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Features B×D×h×w and the guide B×3×P×P (any P) → logits B×K×8h×8w."""
        hidden = self.trunk(features)
        logits = self.coarse(hidden)
        for guide, step in zip(self.guides, self.steps):
            size = (hidden.shape[-2] * 2, hidden.shape[-1] * 2)
            logits = upsample(logits, size)
            pixels = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            hidden = upsample(hidden, size)
            hidden = step(torch.cat([hidden, guide(pixels), logits], dim=1))
        return logits + self.head(hidden)


DECODERS: dict[str, Callable[[int, int], nn.Module]] = {  # (feature channels, output channels) → decoder
    "linear": LinearProbe,
    "seed-cnn": SeedCNN,
    "progressive": ProgressiveDecoder,
    "guided": GuidedDecoder,
}


def build_decoder(name: str, in_dim: int, channels: int = 1) -> nn.Module:
    """Decoder ``name`` reading ``in_dim`` feature channels, with ``channels`` outputs (Classes.channels)."""
    if name not in DECODERS:
        raise FishsegError(f"unknown decoder '{name}'; choose one of {', '.join(DECODERS)}")
    return DECODERS[name](in_dim, channels)


def uses_image(decoder: nn.Module | str) -> bool:
    """Whether a decoder takes the photo as a guide: a registry name, a built decoder, or one inside a
    DistributedDataParallel wrapper."""
    if isinstance(decoder, str):
        return bool(getattr(DECODERS[decoder], "uses_image", False))
    return bool(getattr(getattr(decoder, "module", decoder), "uses_image", False))


def segment(decoder: nn.Module, features: torch.Tensor, size: int, image: torch.Tensor | None = None) -> torch.Tensor:
    """Float16/32 features B×h×w×D (and, for a decoder that ``uses_image``, the guide photo as uint8 RGB
    B×P×P×3) → float32 logits B×size×size (bilinear upsampling of whatever resolution the decoder
    returns: the patch grid, or finer); a decoder with one output per class (several classes) gives
    B×C×size×size."""
    grid = features.permute(0, 3, 1, 2).float()
    if uses_image(decoder):
        assert image is not None, "this decoder needs the guide photo (uint8 B×P×P×3)"
        logits = decoder(grid, image.permute(0, 3, 1, 2).float() / 255)
    else:
        logits = decoder(grid)
    logits = logits.float()
    if logits.shape[-2:] != (size, size):
        logits = upsample(logits, (size, size))
    return logits[:, 0] if logits.shape[1] == 1 else logits


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """The JSON a checkpoint carries: what rebuilds the decoder alone, and where the weights came from."""

    decoder: str  # the registry name
    in_dim: int  # channels of the features it reads (blocks × the backbone's feature dim)
    layers: tuple[int, ...] = LAST_BLOCK  # the cached blocks it reads (before cache format 3: the last block only)
    train_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # as JSON; earlier versions: fewer fields
    cache_fingerprint: str | None = None  # of the cache it was trained on
    val_iou: float | None = None  # after its epoch
    epoch: int | None = None
    fishseg_version: str = __version__  # that wrote it
    classes: tuple[str, ...] | None = None  # with several classes, their names (class 0 the background); None: binary
    colours: tuple[tuple[int, int, int], ...] | None = None  # with several classes, their colours

    @property
    def pixel_classes(self) -> Classes:
        """What the decoder's outputs mean: binary (one channel) unless the checkpoint names its classes."""
        if self.classes is None:
            return Classes()
        return Classes.several(tuple(self.classes), tuple(map(tuple, self.colours or ())))

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, in the order fishseg has always written them."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        return {name: value for name, value in data.items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointMeta:
        """The fields fishseg knows (a checkpoint may carry more); ``decoder`` and ``in_dim`` are required
        (a KeyError, TypeError or ValueError otherwise)."""
        if not isinstance(data, dict):
            raise TypeError("its metadata is not a JSON object")
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        meta = cls(**{**values, "decoder": str(data["decoder"]), "in_dim": int(data["in_dim"])})
        return dataclasses.replace(meta, layers=tuple(meta.layers),
                                   classes=None if meta.classes is None else tuple(meta.classes),
                                   colours=None if meta.colours is None else tuple(map(tuple, meta.colours)))


def save_checkpoint(path: Path, decoder: nn.Module, meta: CheckpointMeta) -> None:
    """Weights and ``meta`` (stamped with this fishseg's version) to one safetensors file."""
    state = {key: value.detach().cpu().contiguous() for key, value in decoder.state_dict().items()}
    description = json.dumps(dataclasses.replace(meta, fishseg_version=__version__).to_json())
    safetensors.torch.save_file(state, str(path), metadata={CHECKPOINT_KEY: description})


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A missing, damaged or foreign checkpoint file becomes a user error naming it."""
    try:
        yield
    except FileNotFoundError:
        raise FishsegError(f"{path}: checkpoint not found") from None
    except (OSError, safetensors.SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise FishsegError(f"{path}: not a valid fishseg checkpoint ({type(error).__name__}: {error})") from None


def read_checkpoint_meta(path: Path) -> CheckpointMeta:
    """The metadata a checkpoint carries, without reading its weights."""
    with _readable(path), safetensors.safe_open(str(path), framework="pt") as file:
        return CheckpointMeta.from_json(json.loads(file.metadata()[CHECKPOINT_KEY]))


def load_checkpoint(path: Path) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the decoder from a checkpoint alone; a damaged or foreign file is a user error."""
    meta = read_checkpoint_meta(path)
    with _readable(path):
        state = safetensors.torch.load_file(str(path))
        decoder = build_decoder(meta.decoder, meta.in_dim, meta.pixel_classes.channels)
        decoder.load_state_dict(state)
    return decoder, meta
