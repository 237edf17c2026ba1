"""The public Python API: every fishseg command as one function of keywords that returns a typed result.

``fishseg extract|train|evaluate|sweep|compare|probe|predict|demo`` parse their options and call these, so
whatever the CLI does (resume with the run's own settings, cross-validation, refusals that keep runs safe),
``import fishseg`` does too. Keywords are named as the CLI's options (``image_size`` for ``--image-size``);
paths may be ``str`` or ``Path``. ``precision`` and ``deterministic`` apply inside the call only. Stage modules
are imported inside the functions, so that ``import fishseg`` (and ``fishseg --help``) does not load
transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

from fishseg.config import DEFAULT_BACKBONE, DEFAULT_COMPRESSION, DemoConfig, ExtractConfig, TrainConfig
from fishseg.errors import FishsegError
from fishseg.results import (CrossValidationResult, EvaluationResult, ExtractResult, PredictionResult, ProbeResult,
                             TrainResult)

if TYPE_CHECKING:
    from fishseg.evaluation.compare import Leaderboard
    from fishseg.inference.export import ExportResult
    from fishseg.training.sweep import SweepPlan, SweepResult

__all__ = ["CrossValidationResult", "EvaluationResult", "ExtractResult", "PredictionResult", "ProbeResult",
           "SweepDeclined", "TrainResult", "compare", "demo", "evaluate", "export", "extract", "predict", "probe",
           "sweep", "train"]

PathLike = Union[str, os.PathLike]
EXTRACT_DEFAULTS = ExtractConfig()
TRAIN_FIELDS = tuple(field.name for field in dataclasses.fields(TrainConfig) if field.name != "fold")
SWEEP_FIELDS = tuple(field for field in TRAIN_FIELDS if field != "folds")  # sweep takes folds as its own keyword

logger = logging.getLogger(__name__)


class SweepDeclined(FishsegError):
    """The sweep's ``confirm`` callback answered no: nothing was written."""


@contextlib.contextmanager
def _runtime(precision: str, deterministic: bool = False) -> Iterator[None]:
    """The call runs under ``precision`` (one of config.PRECISIONS) and, with ``deterministic``, with
    deterministic algorithms only (which stays so for the rest of the process: torch has no scope for it)."""
    from fishseg.runtime import make_deterministic, precision_scope

    with precision_scope(precision):
        if deterministic:
            make_deterministic()
        yield


def extract(data_root: PathLike, out: PathLike, *, backbone: str = DEFAULT_BACKBONE,
            image_size: int = EXTRACT_DEFAULTS.image_size, preview_size: int = EXTRACT_DEFAULTS.preview_size,
            layers: Sequence[int] = EXTRACT_DEFAULTS.layers, views: Sequence[str] = (), batch_size: int | None = None,
            num_workers: int | None = None, compression: str = DEFAULT_COMPRESSION, overwrite: bool = False,
            skip_bad: bool = False, device: str = "auto", precision: str = "auto",
            classes: PathLike | Sequence[str | dict] | None = None,
            config: ExtractConfig | None = None) -> ExtractResult:
    """Run the frozen backbone once over every image under ``data_root`` and write the HDF5 cache ``out``.

    ``classes``: None, masks are binary (non-zero = fish); a class list (entry k names class k, 0 the background),
    or the path of one in JSON: names for masks of class indices (8-bit grayscale or palette PNGs), ``{"name": ...,
    "rgb": [r, g, b]}`` entries for colour-coded RGB masks; or "species", binary masks whose fish pixels take
    their image's species (class) folder as class (Kaggle layout, or images/<class>/). ``config`` gives the
    content settings (backbone, image_size, preview_size, layers, views, normalisation, classes) at once, in
    place of those keywords. A finished cache is kept when up to date and refused when stale (replace it
    with ``overwrite=True``); an interrupted one resumes. Under torchrun each process extracts a share, and every
    process returns the same result."""
    from fishseg.data.labels import class_fields
    from fishseg.features.extract import run_extraction

    data_root = _path(data_root, "data_root")
    pixel_classes = {} if classes is None else class_fields(_class_list(classes), data_root)
    content = ExtractConfig(backbone=backbone, image_size=image_size, preview_size=preview_size, layers=layers,
                            views=views, **pixel_classes)  # (lists become tuples there)
    if config is not None and content != EXTRACT_DEFAULTS:
        raise TypeError("extract(): give the cache's content settings either as `config` or as keywords, not both")
    _require_type(config, ExtractConfig, "config")
    with _runtime(precision):
        cache = run_extraction(data_root, _path(out, "out"), config or content,
                               batch_size=batch_size, num_workers=num_workers, device=device, compression=compression,
                               overwrite=overwrite, skip_bad=skip_bad)
    return ExtractResult.read(cache)


def _class_list(classes: Any) -> str | Path | list:
    """``extract``'s ``classes``: the string "species" or a list of classes as they are, anything else the path of
    a class list."""
    from fishseg.data.labels import SPECIES

    return classes if classes == SPECIES or isinstance(classes, (list, tuple)) else _path(classes, "classes")


def train(cache: PathLike, out: PathLike, *, config: TrainConfig | None = None, resume: bool = False,
          overwrite: bool = False, compiled: bool = False, stream: bool | None = None, device: str = "auto",
          precision: str = "auto", deterministic: bool = False,
          **fields: Any) -> TrainResult | CrossValidationResult:
    """Train a decoder on the cached features into the run folder ``out``; with ``folds=K`` (K >= 2), a K-fold
    cross-validation into ``out/fold-k`` and ``out/cv.json``.

    ``fields`` are TrainConfig fields (``decoder``, ``epochs``, ``lr``, ``folds``, …); ``config`` gives them all at
    once (fields given beside it replace its values). With ``resume=True`` the run's recorded settings are taken
    and only the fields given must agree with them (a disagreeing one is refused, ``epochs`` included: a resume
    finishes the run's own plan; to train longer, train again with ``overwrite=True`` or into another ``out``).
    A folder holding a run is never replaced without ``overwrite=True``. ``stream``: read batches from the file
    (True) or hold the features in memory (False); None chooses by free memory. Under torchrun every process
    returns the same result. ``loss`` defaults to the cache's kind: bce for binary masks, ce for a cache with
    classes (a ``config`` whose loss is TrainConfig's default counts as choosing none)."""
    from fishseg.formats.runs import RunFolder
    from fishseg.training.crossval import run_cross_validation
    from fishseg.training.train import run_training

    _check_keywords("train", fields, TRAIN_FIELDS)
    _require_type(config, TrainConfig, "config")
    given = {**({} if config is None else _fields(config)), **fields}
    cache, out = _path(cache, "cache"), _path(out, "out")
    recorded = RunFolder(out).recorded_config() if resume else None
    chose_loss = "loss" in fields or (config is not None and config.loss != TrainConfig.loss)
    config = dataclasses.replace(recorded, **given) if recorded else TrainConfig(**given)
    if recorded is None and not chose_loss:
        config = dataclasses.replace(config, loss=_cache_loss(cache))  # the cache's kind decides
    options = dict(device=device, stream=stream, resume=resume, overwrite=overwrite, compiled=compiled)
    with _runtime(precision, deterministic):
        if config.folds:
            return CrossValidationResult.from_cv(out, run_cross_validation(cache, out, config, **options))
        return TrainResult.of(out, run_training(cache, out, config, **options))


def _cache_loss(cache: Path) -> str:
    """The loss a run on ``cache`` trains with unless told otherwise (bce for binary, ce with classes)."""
    from fishseg.formats.cache import FeatureCache
    from fishseg.training.losses import default_loss

    with FeatureCache(cache) as opened:
        return default_loss(opened.classes)


def _fields(config: TrainConfig) -> dict[str, Any]:
    """The fields of ``config`` a caller can give (``fold`` is the cross-validation's own)."""
    return {name: getattr(config, name) for name in TRAIN_FIELDS}


def _require_type(value: Any, expected: type, keyword: str) -> None:
    """A ``keyword`` given (not None) must be an ``expected``: anything else is a programming error."""
    if value is not None and not isinstance(value, expected):
        raise TypeError(f"`{keyword}` must be {expected.__name__} or None, not {type(value).__name__}")


def _check_keywords(function: str, given: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}; TrainConfig fields are {', '.join(known)}")


def evaluate(cache: PathLike, run: PathLike, *, out: PathLike | None = None, device: str = "auto",
             precision: str = "auto") -> EvaluationResult:
    """Score the run's best checkpoint on its validation images; write metrics.json, per_image.csv and the report
    into ``out`` (default: ``run/report``). A run with several pixel classes is scored by arg max; its result
    holds ``classes``, ``miou``, ``pixel_accuracy`` and ``class_iou`` (None for a binary run)."""
    from fishseg.evaluation.evaluate import run_evaluation
    from fishseg.evaluation.report import REPORT_HTML
    from fishseg.formats.runs import REPORT_DIR

    run = _path(run, "run")
    out = _path(out, "out") if out is not None else run / REPORT_DIR
    with _runtime(precision):
        metrics = run_evaluation(_path(cache, "cache"), run, out, device=device)
    return EvaluationResult.of(out, out / REPORT_HTML, metrics)


def sweep(cache: PathLike, out: PathLike, *, grid: Mapping[str, Any] | None = None, grid_file: PathLike | None = None,
          folds: int | None = None, jobs: int = 1, retry_failed: bool = False, yes: bool = False,
          confirm: Callable[[SweepPlan], bool] | None = None, stream: bool | None = None, device: str = "auto",
          precision: str = "auto", deterministic: bool = False, **lists: Any) -> SweepResult:
    """Train every combination of the values given (the Cartesian product) into ``out``, then compare them.

    Values come from ``grid_file`` (TOML), then ``grid`` (field → values), then ``lists`` (``lr=[1e-3, 3e-4]``),
    each replacing the earlier's values of a field; one value stands for a list of one (``layers`` takes a list
    of block tuples). ``folds``: each config is a K-fold cross-validation (None: the grid file's ``cv``, else 0).
    ``confirm`` sees the plan before anything is written; above 50 configs to train, without ``yes=True``, its
    answer decides (False raises SweepDeclined), and without ``confirm`` the sweep is refused. ``loss`` defaults to
    the cache's kind, as for ``train``."""
    from fishseg.training.sweep import read_grid_file, run_sweep

    for keywords in (lists, grid or {}):
        _check_keywords("sweep", keywords, SWEEP_FIELDS)
    values = read_grid_file(_path(grid_file, "grid_file"), SWEEP_FIELDS) if grid_file is not None else {}
    file_folds = values.pop("folds", (0,))[0]
    values.update({field: _values(field, value) for field, value in {**(grid or {}), **lists}.items()})
    loss = None if "loss" in values else _cache_loss(_path(cache, "cache"))
    if loss not in (None, TrainConfig.loss):
        values["loss"] = (loss,)  # no loss swept: the cache's kind decides (ce with classes)
    with _runtime(precision, deterministic):
        return run_sweep(_path(cache, "cache"), _path(out, "out"), values,
                         folds=file_folds if folds is None else folds, device=device, stream=stream, jobs=jobs,
                         retry_failed=retry_failed, confirm=_confirmation(yes, confirm))


def _values(field: str, value: Any) -> tuple:
    """A sweep's values of one field: a list or tuple is the values (refused empty), anything else one value."""
    if isinstance(value, (list, tuple)) and not value:
        raise FishsegError(f"`{field}`: an empty list of values; give at least one, or leave `{field}` out for its "
                           f"default")
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _confirmation(yes: bool, confirm: Callable[[SweepPlan], bool] | None) -> Callable[[SweepPlan], None]:
    """What the sweep does with its plan: show it (to ``confirm``, else the log) and, above the threshold
    without ``yes``, start only on a yes."""
    from fishseg.training.sweep import CONFIRM_ABOVE

    def check(plan: SweepPlan) -> None:
        must_agree = plan.needs_confirmation and not yes
        if confirm is None:
            logger.info("%s", plan.describe())
            if must_agree:
                raise FishsegError(f"{plan.to_train} configs to train, more than {CONFIRM_ABOVE}: pass `yes=True` "
                                   f"to start them, or a `confirm` callback that asks")
        elif not confirm(plan) and must_agree:
            raise SweepDeclined(f"sweep not started ({plan.to_train} configs to train, declined): nothing was "
                                f"written")

    return check


def compare(folders: PathLike | Sequence[PathLike], *, baseline: PathLike | None = None, out: PathLike | None = None,
            cache: PathLike | None = None, device: str = "auto", precision: str = "auto") -> Leaderboard:
    """Put runs, cross-validations and sweeps side by side, paired image by image with the best (or
    ``baseline``), and write the leaderboard into ``out`` (default: the sweep folder when it is the only folder
    given, else ./compare). ``cache`` scores runs not evaluated yet (default: the path the runs recorded)."""
    from fishseg.evaluation.compare import run_compare

    paths = _paths(folders, "folders", "run, cross-validation or sweep folder")
    with _runtime(precision):
        return run_compare(paths, _optional_path(out, "out"), baseline=_optional_path(baseline, "baseline"),
                           cache_path=_optional_path(cache, "cache"), device=device)


def _path(value: Any, keyword: str) -> Path:
    """``value`` as a Path: a str or os.PathLike, anything else is a programming error (a TypeError, as Python's
    own functions raise)."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise TypeError(f"`{keyword}` must be a path (str or os.PathLike), not {type(value).__name__}")


def _optional_path(value: Any, keyword: str) -> Path | None:
    return None if value is None else _path(value, keyword)


def _paths(value: Any, keyword: str, each: str) -> list[Path]:
    """One path, or a list or tuple of them (refused empty: ``each`` says what one is)."""
    if not isinstance(value, (list, tuple)):
        return [_path(value, keyword)]
    if not value:
        raise FishsegError(f"`{keyword}`: an empty list; give at least one {each}")
    return [_path(item, keyword) for item in value]


def probe(cache: PathLike, *, split: str = TrainConfig.split, group_pattern: str = "",
          val_fraction: float = TrainConfig.val_fraction, seed: int = TrainConfig.seed,
          json: PathLike | None = None) -> ProbeResult:
    """Species from mean-pooled cached features (logistic regression), fitted and scored on the split that
    ``train`` would use with these settings; with ``json``, also written there."""
    from fishseg.data.splits import split_indices
    from fishseg.evaluation.probe import run_probe
    from fishseg.formats.cache import FeatureCache
    from fishseg.runtime import write_json

    config = TrainConfig(val_fraction=val_fraction, seed=seed, split=split, group_pattern=group_pattern)
    json = _optional_path(json, "json")
    with FeatureCache(_path(cache, "cache")) as features:
        train_idx, val_idx, _ = split_indices(features, config)
        result = run_probe(features, train_idx, val_idx)
    if json is not None:
        write_json(json, result)
    return ProbeResult.of(split, result, json)


def predict(inputs: PathLike | Sequence[PathLike], run: PathLike, out: PathLike, *, backbone: str | None = None,
            batch_size: int = 8, num_workers: int | None = None, skip_bad: bool = False, overwrite: bool = False,
            device: str = "auto", precision: str = "auto") -> PredictionResult:
    """Predict a mask for every image in ``inputs`` (files or folders) at its own size into ``out`` (masks/,
    overlays/, predictions.csv; a run with several classes writes label PNGs, overlays with a legend and an area
    column per class). ``backbone`` defaults to the run's; its weights are checked against the run's."""
    from fishseg.inference.predict import run_prediction

    paths = _paths(inputs, "inputs", "image or folder of images")
    with _runtime(precision):
        return run_prediction(_path(run, "run"), paths, _path(out, "out"), backbone=backbone, batch_size=batch_size,
                              num_workers=num_workers, device=device, skip_bad=skip_bad, overwrite=overwrite)


def export(run: PathLike, out: PathLike, *, backbone: str | None = None, opset: int | None = None,
           overwrite: bool = False) -> ExportResult:
    """Write the run's best decoder and its backbone as one ONNX graph ``out`` (uint8 N×3×S×S images in, fish
    probabilities N×1×S×S out, or class probabilities N×C×S×S for a run with several classes; normalisation
    inside; docs/export.md). Needs ``pip install fishseg[export]``."""
    from fishseg.inference.export import export_onnx

    return export_onnx(_path(run, "run"), _path(out, "out"), backbone=backbone, opset=opset, overwrite=overwrite)


def demo(out: PathLike = "fishseg-demo", *, backbone: str | None = None, classes: int = 3, images_per_class: int = 12,
         epochs: int = 20, image_size: int = EXTRACT_DEFAULTS.image_size, overwrite: bool = False, device: str = "auto",
         precision: str = "auto") -> EvaluationResult:
    """Generate a small fish dataset in ``out`` and run extract → train → evaluate on it (backbone None: a
    random-init ViT-S/16). ``out`` must be new, empty, or an earlier demo (replaced with ``overwrite=True``)."""
    from fishseg.end_to_end import run_demo

    config = DemoConfig(classes=classes, images_per_class=images_per_class, epochs=epochs, image_size=image_size)
    with _runtime(precision):
        return run_demo(_path(out, "out"), config, backbone=backbone, device=device, overwrite=overwrite)
