"""The end-to-end demo (`fishseg demo`, `fishseg.demo`): generate fish photos → extract → train → evaluate →
report, in one folder.

Not named `demo.py`: importing a submodule sets it on the package, where it would replace the function `fishseg.demo`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fishseg.config import DemoConfig, ExtractConfig, TrainConfig
from fishseg.data.synthetic import DATA_NOTE, generated_dataset, write_demo_dataset
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.evaluation.report import REPORT_HTML
from fishseg.features.extract import run_extraction
from fishseg.models.backbone import save_random_backbone
from fishseg.results import EvaluationResult
from fishseg.runtime import removed_on_error
from fishseg.training.train import run_training

logger = logging.getLogger(__name__)


def run_demo(out: Path, config: DemoConfig, *, backbone: str | None = None, device: str = "auto",
             overwrite: bool = False) -> EvaluationResult:
    """Run the whole pipeline on generated data under ``out``; returns the evaluation (report in ``out/report``).

    ``out`` must be new, empty, or (with ``overwrite``) an earlier demo, whose data, cache, run and report are
    then replaced; anything else in it (a sweep of the demo cache, say) is left alone."""
    earlier = _check_out(out, overwrite)
    with removed_on_error(out):
        if earlier:
            shutil.rmtree(generated_dataset(out / "data"), ignore_errors=True)  # another --classes leaves no strays
        return _run_demo(out, config, backbone, device, overwrite)


def _check_out(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds an earlier demo to replace; refused, before anything is written: an earlier demo
    without ``overwrite``, and a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise FishsegError(f"{out}: is a file; `out` is the demo's folder (a new or empty one)")
    contents = sorted(f"{path.name}/" if path.is_dir() else path.name for path in out.iterdir()) if out.is_dir() else []
    if not contents:
        return False
    listing = ", ".join(contents[:4]) + (", …" if len(contents) > 4 else "")
    marker = generated_dataset(out / "data") / "Fish_Dataset" / "README.txt"
    if marker.is_file() and marker.read_text(errors="replace") == DATA_NOTE:
        if not overwrite:
            raise FishsegError(f"{out}: holds an earlier demo ({listing}); pass `overwrite=True` to replace it, "
                               f"or choose another `out`")
        return True
    raise FishsegError(f"{out}: holds {listing}, not a demo; choose another `out` (a new or empty folder)")


def _run_demo(out: Path, config: DemoConfig, backbone: str | None, device: str, overwrite: bool) -> EvaluationResult:
    data_root = write_demo_dataset(out / "data", classes=config.classes, images_per_class=config.images_per_class)
    if backbone is None:
        backbone = str(save_random_backbone(out / "backbone-random-init"))
        logger.warning("no `backbone` given: using a RANDOM-INIT DINOv3 ViT-S/16 saved at %s", backbone)
    cache = run_extraction(data_root, out / "cache.h5", ExtractConfig(backbone=backbone, image_size=config.image_size),
                           device=device, overwrite=overwrite)
    run_training(cache, out / "run", TrainConfig(epochs=config.epochs), device=device, overwrite=overwrite)
    metrics = run_evaluation(cache, out / "run", out / "report", device=device)
    return EvaluationResult.of(out / "report", out / "report" / REPORT_HTML, metrics)
