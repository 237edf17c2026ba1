from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fishseg import __version__
from fishseg.config import DECODER_NAMES
from fishseg.errors import FishsegError
from fishseg.models.decoders import (CHECKPOINT_KEY, DECODERS, CheckpointMeta, build_decoder, load_checkpoint,
                                     read_checkpoint_meta, save_checkpoint, segment, uses_image)

OUTPUT_SCALE = {"linear": 1, "seed-cnn": 1, "progressive": 16, "guided": 8}  # logits per patch side


def guide_photos(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 RGB guides B×P×P×3, as the cache's previews are stored."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def test_the_registry_and_the_config_name_the_same_decoders() -> None:
    assert tuple(DECODERS) == DECODER_NAMES


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_registered_decoder_maps_a_grid_to_one_logit_map_and_learns(name: str) -> None:
    decoder, scale = build_decoder(name, 24), OUTPUT_SCALE[name]
    image = (torch.rand(2, 3, 40, 40),) if uses_image(decoder) else ()
    logits = decoder(torch.randn(2, 24, 7, 9), *image)
    assert logits.shape == (2, 1, 7 * scale, 9 * scale)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


def test_segment_upsamples_to_the_mask_size() -> None:
    decoder = build_decoder("seed-cnn", 16).eval()
    logits = segment(decoder, torch.randn(3, 8, 8, 16, dtype=torch.float16), 64)
    assert logits.shape == (3, 64, 64) and logits.dtype == torch.float32


def test_only_the_guided_decoder_uses_the_image() -> None:
    assert [name for name in DECODERS if uses_image(name)] == ["guided"]
    assert uses_image(build_decoder("guided", 8)) and not uses_image(build_decoder("seed-cnn", 8))
    wrapper = torch.nn.Module()
    wrapper.module = build_decoder("guided", 8)  # as DistributedDataParallel holds it
    assert uses_image(wrapper)


def test_guided_segmentation_follows_the_guide_photo() -> None:
    torch.manual_seed(0)
    decoder = build_decoder("guided", 16).eval()
    features = torch.randn(2, 8, 8, 16)
    logits = segment(decoder, features, 64, guide_photos(2))
    assert logits.shape == (2, 64, 64) and logits.dtype == torch.float32
    torch.testing.assert_close(segment(decoder, features, 64, guide_photos(2)), logits)  # deterministic
    other = segment(decoder, features, 64, guide_photos(2, seed=1))
    assert (other - logits).abs().mean() > 1e-3  # another photo, other logits, from the same features


def test_a_decoder_that_uses_the_image_refuses_to_run_without_it() -> None:
    with pytest.raises(AssertionError, match="needs the guide photo"):
        segment(build_decoder("guided", 16).eval(), torch.randn(1, 8, 8, 16), 64)


def test_seed_cnn_matches_the_reference_architecture() -> None:
    convs = [m for m in build_decoder("seed-cnn", 384).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (384, 128, (3, 3)), (128, 64, (3, 3)), (64, 1, (1, 1))]


@pytest.mark.parametrize("name", ["seed-cnn", "guided"])
def test_checkpoint_round_trip_rebuilds_the_same_decoder(name: str, tmp_path: Path) -> None:
    decoder = build_decoder(name, 16)
    segment(decoder, torch.randn(4, 8, 8, 16), 32, guide_photos(4))  # move BatchNorm running stats off their defaults
    save_checkpoint(tmp_path / "c.safetensors", decoder.eval(), CheckpointMeta(name, 16, epoch=3))
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta.epoch == 3 and meta.fishseg_version == __version__ and uses_image(loaded) == uses_image(name)
    features, guides = torch.randn(2, 8, 8, 16), guide_photos(2)
    expected = segment(decoder, features, 32, guides)
    torch.testing.assert_close(segment(loaded.eval(), features, 32, guides), expected)


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, build_decoder("seed-cnn", 16), CheckpointMeta("seed-cnn", 16))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FishsegError, match="c.safetensors: not a valid fishseg checkpoint"):
        load_checkpoint(path)


def test_unknown_decoder_is_refused() -> None:
    with pytest.raises(FishsegError, match="unknown decoder 'unet'; choose one of linear, seed-cnn, progressive, "
                                           "guided"):
        build_decoder("unet", 8)


def test_checkpoint_meta_reads_what_earlier_versions_wrote(tmp_path: Path) -> None:
    """The JSON of a checkpoint keeps its keys and their order; one written before layers were recorded reads the
    last block, keys fishseg does not know are ignored, and metadata without a decoder is refused naming the file."""
    path = tmp_path / "c.safetensors"
    written = {"decoder": "linear", "in_dim": 16, "layers": [-2, -1], "train_config": {"lr": 0.001},
               "cache_fingerprint": "abc", "val_iou": 0.5, "epoch": 2, "fishseg_version": "0.1"}
    assert CheckpointMeta.from_json(written).to_json() == written
    assert list(CheckpointMeta.from_json(written).to_json()) == list(written)
    old = CheckpointMeta.from_json({"decoder": "linear", "in_dim": 16, "epoch": 1, "extra": True})
    assert old.layers == (-1,) and old.train_config == {} and old.cache_fingerprint is None
    safetensors.torch.save_file(build_decoder("linear", 16).state_dict(), str(path),
                                metadata={CHECKPOINT_KEY: json.dumps({"in_dim": 16})})
    with pytest.raises(FishsegError, match=r"c.safetensors: not a valid fishseg checkpoint \(KeyError: 'decoder'\)"):
        read_checkpoint_meta(path)
