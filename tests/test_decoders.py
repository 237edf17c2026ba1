from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fishseg.decoders import DECODERS, build_decoder, load_checkpoint, save_checkpoint, segment
from fishseg.errors import FishsegError


OUTPUT_SCALE = {"linear": 1, "seed-cnn": 1, "progressive": 16}  # logits per patch side; a new decoder adds its own


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_registered_decoder_maps_a_grid_to_one_logit_map_and_learns(name: str) -> None:
    decoder, scale = build_decoder(name, 24), OUTPUT_SCALE[name]
    logits = decoder(torch.randn(2, 24, 7, 9))
    assert logits.shape == (2, 1, 7 * scale, 9 * scale)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


def test_segment_upsamples_to_the_mask_size() -> None:
    decoder = build_decoder("seed-cnn", 16).eval()
    logits = segment(decoder, torch.randn(3, 8, 8, 16, dtype=torch.float16), 64)
    assert logits.shape == (3, 64, 64) and logits.dtype == torch.float32


def test_seed_cnn_matches_the_reference_architecture() -> None:
    convs = [m for m in build_decoder("seed-cnn", 384).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (384, 128, (3, 3)), (128, 64, (3, 3)), (64, 1, (1, 1))]


def test_checkpoint_round_trip_rebuilds_the_same_decoder(tmp_path: Path) -> None:
    decoder = build_decoder("seed-cnn", 16)
    decoder(torch.randn(4, 16, 8, 8))  # move BatchNorm running stats off their defaults
    save_checkpoint(tmp_path / "c.safetensors", decoder.eval(), {"decoder": "seed-cnn", "in_dim": 16, "epoch": 3})
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta["epoch"] == 3 and "fishseg_version" in meta
    features = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(loaded.eval()(features), decoder(features))


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, build_decoder("seed-cnn", 16), {"decoder": "seed-cnn", "in_dim": 16})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FishsegError, match="c.safetensors: not a valid fishseg checkpoint"):
        load_checkpoint(path)


def test_unknown_decoder_is_refused() -> None:
    with pytest.raises(FishsegError, match="unknown decoder 'unet'; choose one of linear, seed-cnn, progressive"):
        build_decoder("unet", 8)
