"""Configs validate their own fields: the Python API refuses what the CLI refuses, nothing falls through."""

from __future__ import annotations

import dataclasses

import pytest

from fishseg.config import (DECODER_NAMES, BackboneInfo, ExtractConfig, TrainConfig, check_patch_multiple, from_json,
                            resolve_layers, to_json, value_text)
from fishseg.errors import FishsegError
from fishseg.models.decoders import DECODERS


@pytest.mark.parametrize("field, value, message", [
    ("decoder", "unet", "decoder 'unet': expected one of linear, seed-cnn, progressive"),
    ("loss", "focal", "loss 'focal': expected one of bce, dice, bce\\+dice"),
    ("schedule", "step", "schedule 'step': expected one of constant, cosine"),
    ("split", "stratified", "split 'stratified': expected one of random, grouped"),
    ("augment", "crops", "augment 'crops': expected one of none, flips, views"),
    ("layers", (0,), "layers 0: expected block indices 1 … n, or -1 … -n counting from the end"),
    ("layers", (12, 12), "layers 12,12: expected each value once"),  # as typed, not Python's (12, 12)
    ("layers", ("12",), "layers '12': expected block indices"),
    ("epochs", 0, "epochs 0: expected a whole number >= 1"),
    ("epochs", 2.0, "epochs 2.0: expected a whole number >= 1"),
    ("batch_size", True, "batch_size true: expected a whole number >= 1"),  # as TOML writes it
    ("epochs", True, "epochs true: expected a whole number >= 1"),
    ("seed", False, "seed false: expected a whole number >= 0"),
    ("folds", False, "folds false: expected 0 \\(one split\\) or a whole number >= 2"),
    ("folds", -2, "folds -2: expected 0 \\(one split\\) or a whole number >= 2"),
    ("group_pattern", "fish_\\d(", "group_pattern 'fish_\\\\d\\(': not a regular expression"),  # one backslash
    ("lr", float("nan"), "lr nan: expected a finite number in \\(0, inf\\)"),
    ("lr", 0.0, "lr 0.0: expected a finite number in \\(0, inf\\)"),
    ("weight_decay", float("inf"), "weight_decay inf: expected a finite number in \\[0, inf\\)"),
    ("val_fraction", 1.0, "val_fraction 1.0: expected a finite number in \\(0, 1\\)"),
    ("seed", -1, "seed -1: expected a whole number >= 0"),
    ("group_pattern", "fish_(", "group_pattern 'fish_\\(': not a regular expression"),
    ("folds", 1, "folds 1: expected 0 \\(one split\\) or a whole number >= 2"),
    ("warmup_epochs", -1, "warmup_epochs -1: expected a whole number >= 0"),
])
def test_every_train_field_is_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(FishsegError, match=message):
        TrainConfig(**{field: value})


def test_a_fold_must_exist() -> None:
    assert TrainConfig(folds=3, fold=2).fold == 2
    with pytest.raises(FishsegError, match="fold 3: expected a fold index below folds \\(3\\)"):
        TrainConfig(folds=3, fold=3)
    with pytest.raises(FishsegError, match="fold 1: expected a fold index below folds \\(0\\)"):
        TrainConfig(fold=1)


@pytest.mark.parametrize("field, value", [("image_size", 0), ("preview_size", -4), ("backbone", ""),
                                          ("std", (0.2, 0.0, 0.2)), ("mean", (0.5, float("nan"), 0.5)),
                                          ("mean", (0.5, 0.5)), ("layers", ()), ("layers", (1.5,)),
                                          ("views", ("hflip", "shear")), ("views", ("hflip", "hflip"))])
def test_every_extract_field_is_checked(field: str, value: object) -> None:
    with pytest.raises(FishsegError, match=f"^{field} "):
        ExtractConfig(**{field: value})


def test_the_decoder_names_are_the_registry() -> None:
    """config.py names the decoders without importing torch; the registry must build exactly those."""
    assert tuple(DECODERS) == DECODER_NAMES


def test_configs_round_trip_through_json() -> None:
    config = TrainConfig(decoder="linear", lr=3e-4, folds=5, fold=4, group_pattern=r"^fish_\d+")
    assert from_json(TrainConfig, to_json(config)) == config
    extract = dataclasses.replace(ExtractConfig(), image_size=224, layers=(6, -1), views=("hflip", "rot90"))
    assert from_json(ExtractConfig, to_json(extract)) == extract


def test_layers_read_back_as_a_tuple_and_resolve_against_the_block_count() -> None:
    assert TrainConfig(layers=[6, 9]).layers == (6, 9) and TrainConfig(layers=-1).layers == (-1,)  # JSON, sweep grid
    assert resolve_layers((6, 9, 12), 12) == (6, 9, 12) and resolve_layers((-1, -4), 12) == (12, 9)
    with pytest.raises(FishsegError, match="layers 13: the backbone has 12 blocks \\(1 … 12, or -1 … -12"):
        resolve_layers((13,), 12)
    with pytest.raises(FishsegError, match="layers 12,-1: name the same block twice"):
        resolve_layers((12, -1), 12)


@pytest.mark.parametrize("size, patch, suggestion", [(60, 16, "64"), (52, 16, "48"), (56, 16, "48 or 64"),
                                                     (10, 16, "16"), (62, 8, "64")])
def test_an_image_size_off_the_patch_grid_suggests_the_nearest_multiples(size: int, patch: int,
                                                                          suggestion: str) -> None:
    check_patch_multiple(size - size % patch or patch, patch)
    with pytest.raises(FishsegError, match=f"^`image_size={size}`: not a multiple of the backbone's patch size "
                                           f"{patch}; try {suggestion}$"):
        check_patch_multiple(size, patch)


def test_the_backbone_record_of_an_older_cache_reads_with_architecture_and_weights_unrecorded() -> None:
    older = ('{"feature_dim": 384, "model_type": "dinov3_vit", "name": "facebook/dinov3-vits16-pretrain-lvd1689m", '
             '"num_register_tokens": 4, "patch_size": 16, "random_init": false}')
    info = from_json(BackboneInfo, older)
    assert (info.num_blocks, info.num_heads, info.mlp_dim, info.mlp, info.weights_sha256) == (None,) * 5
    assert info.architecture == {"model_type": "dinov3_vit", "patch_size": 16, "feature_dim": 384,
                                 "num_register_tokens": 4, "num_blocks": None, "num_heads": None, "mlp_dim": None,
                                 "mlp": None}


@pytest.mark.parametrize("value, text", [(1e6, "1e6"), (2.5e7, "2.5e7"), (1e16, "1e16"), (100000.0, "1e5"),
                                         (123456.0, "123456.0"), (0.001, "0.001"), (3e-4, "0.0003"), (1e-05, "1e-05"),
                                         (1.0, "1.0"), (0.2, "0.2"), (-1e6, "-1e6")])
def test_floats_read_short_and_exact_and_existing_sweep_names_stay(value: float, text: str) -> None:
    assert value_text(value) == text and float(text) == value


def test_a_refused_large_float_is_shown_as_typed() -> None:
    with pytest.raises(FishsegError, match=r"^val_fraction 1e6: expected a finite number in \(0, 1\)$"):
        TrainConfig(val_fraction=1e6)
