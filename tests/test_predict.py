from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result
from PIL import Image

import fishseg.evaluation.evaluate as evaluate_module
import fishseg.inference.segmenter as segmenter_module
from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.data.images import discover_samples, read_mask
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import RunFolder
from fishseg.inference.predict import run_prediction
from fishseg.inference.segmenter import OVERLAY_ALPHA, OVERLAY_COLOUR, full_size, tint
from fishseg.models.backbone import save_random_backbone
from fishseg.models.decoders import segment
from fishseg.runtime import precision_scope, read_json, write_json
from fishseg.training.train import run_training
from tests.helpers import SMALL_PHOTO, TINY_LAYOUT


@pytest.fixture(scope="module")
def trained_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "run"
    run_training(tiny_cache, run, TrainConfig(epochs=15, batch_size=4, lr=3e-3, val_fraction=0.2), device="cpu")
    return run


def test_predict_round_trip_gives_masks_at_input_size_close_to_the_truth(trained_run: Path, kaggle_root: Path,
                                                                        tmp_path: Path) -> None:
    samples = discover_samples(kaggle_root)
    folders = sorted({s.image_path.parent for s in samples})  # the species' image folders, not their GT folders
    result = run_prediction(trained_run, folders, tmp_path, num_workers=0, device="cpu")
    assert result.skipped == () and result.csv == tmp_path / "predictions.csv"
    rows = list(csv.DictReader(result.csv.open()))
    assert result.masks == tuple(tmp_path / row["mask"] for row in rows)
    assert [Path(r["file"]) for r in rows] == [s.image_path for s in samples]
    ious = []
    for row, sample in zip(rows, samples):
        mask = np.asarray(Image.open(tmp_path / row["mask"])) > 0
        assert mask.shape == (SMALL_PHOTO[1], SMALL_PHOTO[0]) == (int(row["height"]), int(row["width"]))
        assert Image.open(tmp_path / "overlays" / Path(row["mask"]).name).size == SMALL_PHOTO
        assert int(row["area_px"]) == mask.sum()
        assert float(row["foreground_fraction"]) == pytest.approx(mask.mean(), abs=1e-6)
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert [int(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")] == [xs.min(), ys.min(),
                                                                                          xs.max(), ys.max()]
            assert 0.5 < float(row["mean_probability"]) <= 1
        truth = np.asarray(read_mask(sample.mask_path)).astype(bool)
        ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
    assert np.mean(ious) > 0.5  # measured 0.73 (lowest image 0.54) with the tiny random backbone at 64 px


def test_predict_works_on_a_folder_without_masks_and_names_repeated_stems_apart(trained_run: Path,
                                                                                kaggle_root: Path,
                                                                                tmp_path: Path) -> None:
    source = next(kaggle_root.rglob("00001.png"))
    for folder in ("NA_Fish_Dataset/a", "NA_Fish_Dataset/b"):
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(source, tmp_path / folder / "00001.png")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "NA_Fish_Dataset"), "--run", str(trained_run),
                                       "--out", str(tmp_path / "out"), "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["00001-2.png", "00001.png"]


def test_a_guided_run_evaluates_and_predicts_with_the_photo_as_its_guide(tiny_cache: Path, kaggle_root: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation guides with the cached previews; prediction makes the guide from the photo exactly as extraction
    made the preview."""
    run = tmp_path / "guided"
    run_training(tiny_cache, run, TrainConfig(decoder="guided", epochs=2, batch_size=4), device="cpu")
    guides: list[torch.Tensor | None] = []

    def recording(decoder: torch.nn.Module, features: torch.Tensor, size: int,
                  image: torch.Tensor | None = None) -> torch.Tensor:
        guides.append(image)
        return segment(decoder, features, size, image)

    monkeypatch.setattr(evaluate_module, "segment", recording)
    monkeypatch.setattr(segmenter_module, "segment", recording)
    metrics = run_evaluation(tiny_cache, run, tmp_path / "report", device="cpu")
    assert metrics["n_images"] == len(RunFolder(run).read_split()["val"]) and 0 <= metrics["mean_boundary_f"] <= 1
    assert (tmp_path / "report" / "report.html").is_file()
    sample = discover_samples(kaggle_root)[5]
    with FeatureCache(tiny_cache) as cache:
        val = cache.indices_of(RunFolder(run).read_split()["val"], run)
        cached = torch.from_numpy(cache.previews(val))
        preview = torch.from_numpy(cache.previews(cache.indices_of([sample.image_id], run)))
    assert torch.equal(guides[0], cached)  # the validation images in one batch, each with its preview
    guides.clear()
    [mask] = run_prediction(run, [sample.image_path], tmp_path / "out", num_workers=0, device="cpu").masks
    assert len(guides) == 1 and torch.equal(guides[0], preview)
    assert mask.is_file()


def test_predict_refuses_a_different_backbone(trained_run: Path, kaggle_root: Path, tmp_path: Path) -> None:
    other = save_random_backbone(tmp_path / "other", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, patch_size=8)
    with pytest.raises(FishsegError, match=r"differs from the one the run was trained on .*feature_dim 32 → 16"):
        run_prediction(trained_run, [kaggle_root], tmp_path / "out", backbone=str(other), num_workers=0, device="cpu")
    assert not (tmp_path / "out").exists()


def test_upsampled_probabilities_match_float_bilinear_to_one_level_in_255() -> None:
    probability = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    full = full_size(probability, (50, 30))
    assert full.dtype == np.uint8 and full.shape == (30, 50)
    exact = F.interpolate(probability[None, None], size=(30, 50), mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(full / 255 - exact.numpy()).max() < 2 / 255


def test_tint_blends_the_colour_over_the_fish_only() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 3:20] = True
    tinted = np.asarray(tint(Image.fromarray(pixels), mask), float)
    expected = (1 - OVERLAY_ALPHA) * pixels[mask] + OVERLAY_ALPHA * np.array(OVERLAY_COLOUR)
    assert np.abs(tinted[mask] - expected).max() <= 1
    np.testing.assert_array_equal(tinted[~mask], pixels[~mask])


def _predict(run: Path, inputs: list[Path], out: Path, *options: str) -> Result:
    return CliRunner().invoke(main, ["predict", *map(str, inputs), "--run", str(run), "--out", str(out),
                                     "--num-workers", "0", "--device", "cpu", *options])


@pytest.mark.parametrize("blocks", [3, 12])
def test_predict_refuses_a_backbone_of_another_depth_naming_it(tiny_run: Path, kaggle_root: Path, tmp_path: Path,
                                                               blocks: int) -> None:
    """Same width, heads and patch size as the run's 1-block backbone: only the number of blocks differs."""
    deeper = save_random_backbone(tmp_path / "deeper", **{**TINY_LAYOUT, "num_hidden_layers": blocks})
    result = _predict(tiny_run, [kaggle_root], tmp_path / "out", "--backbone", str(deeper))
    assert result.exit_code == 2, result.output
    assert f"num_blocks 1 → {blocks}" in result.output and "has the architecture" not in result.output
    assert not (tmp_path / "out").exists()


def test_predict_refuses_the_same_architecture_with_other_weights(tiny_run: Path, kaggle_root: Path,
                                                                 tmp_path: Path) -> None:
    reseeded = save_random_backbone(tmp_path / "reseeded", seed=1, **TINY_LAYOUT)
    result = _predict(tiny_run, [kaggle_root], tmp_path / "out", "--backbone", str(reseeded))
    assert result.exit_code == 2, result.output
    assert "same architecture, other weights (sha256 " in result.output and len(result.output.splitlines()) == 1


def test_predict_accepts_the_runs_backbone_copied_elsewhere(tiny_run: Path, tiny_backbone: Path, kaggle_root: Path,
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy = shutil.copytree(tiny_backbone, tmp_path / "copy")
    source = next(kaggle_root.rglob("00001.png"))
    run_prediction(tiny_run, [source], tmp_path / "out", backbone=str(copy), num_workers=0, device="cpu")
    assert (tmp_path / "out" / "masks" / "00001.png").is_file() and not caplog.records


def test_a_run_whose_cache_did_not_record_the_weights_predicts_with_a_warning(tiny_run: Path, kaggle_root: Path,
                                                                              tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Runs on caches of earlier versions record neither the digest nor the whole architecture."""
    run = shutil.copytree(tiny_run, tmp_path / "old-run")
    record = read_json(run / "run.json")
    for field in ("num_blocks", "num_heads", "mlp_dim", "mlp", "weights_sha256"):
        del record["backbone"][field]
    write_json(run / "run.json", record)
    source = next(kaggle_root.rglob("00001.png"))
    run_prediction(run, [source], tmp_path / "out", num_workers=0, device="cpu")
    assert "only the architecture could be checked" in caplog.text and "has the architecture" not in caplog.text


def _masks_and_overlays(out: Path) -> tuple[list[str], list[str]]:
    return sorted(p.name for p in (out / "masks").iterdir()), sorted(p.name for p in (out / "overlays").iterdir())


def _listed(out: Path) -> list[str]:
    return sorted(Path(row["mask"]).name for row in csv.DictReader((out / "predictions.csv").open()) if row["mask"])


def test_predict_into_earlier_predictions_is_refused_and_overwrite_replaces_only_them(tiny_run: Path,
                                                                                      kaggle_root: Path,
                                                                                      tmp_path: Path) -> None:
    photos = sorted(kaggle_root.rglob("*.png"))
    first, second = [p for p in photos if "GT" not in str(p)][:3], [p for p in photos if "GT" not in str(p)][3:5]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _predict(tiny_run, first, out).exit_code == 0
    before = _masks_and_overlays(out)
    refused = _predict(tiny_run, second, out)
    assert refused.exit_code == 2 and f"{out}: holds earlier predictions" in refused.output
    assert "--overwrite" in refused.output and _masks_and_overlays(out) == before
    assert _predict(tiny_run, second, out, "--overwrite").exit_code == 0
    masks, overlays = _masks_and_overlays(out)
    assert masks == overlays == _listed(out) and len(masks) == 2  # none of the first run's files is left
    assert (out / "notes.txt").read_text() == "mine"


def test_predict_never_writes_among_masks_it_did_not_write(tiny_run: Path, kaggle_root: Path, tmp_path: Path) -> None:
    """A data folder in the images/ + masks/ layout: its ground truth must not be replaced, --overwrite or not."""
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    photo = next(p for p in kaggle_root.rglob("00001.png") if "GT" not in str(p))
    truth = next(p for p in kaggle_root.rglob("00001.png") if "GT" in str(p))
    shutil.copy(truth, data / "masks" / "00001.png")
    for options in ((), ("--overwrite",)):
        result = _predict(tiny_run, [photo], data, *options)
        assert result.exit_code == 2 and "no predictions.csv lists (e.g. masks/00001.png)" in result.output
    assert (data / "masks" / "00001.png").read_bytes() == truth.read_bytes()


def test_a_failed_prediction_into_an_existing_folder_leaves_no_unlisted_files(tiny_run: Path, kaggle_root: Path,
                                                                              tmp_path: Path) -> None:
    photos = [p for p in sorted(kaggle_root.rglob("*.png")) if "GT" not in str(p)][:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    result = _predict(tiny_run, [*photos, broken], out, "--batch-size", "2")  # the first batch is written
    assert result.exit_code == 2 and "--skip-bad" in result.output
    assert sorted(p.name for p in out.iterdir()) == []


def test_predict_runs_under_the_active_precision(tiny_run: Path, kaggle_root: Path, tmp_path: Path) -> None:
    """The precision asked for around run_prediction (the CLI's --precision) reaches its Segmenter."""
    with precision_scope("fp16"), pytest.raises(FishsegError, match="fp16.*: needs a CUDA GPU"):
        run_prediction(tiny_run, [kaggle_root], tmp_path / "out", num_workers=0, device="cpu")
    assert not (tmp_path / "out").exists()
