"""The formats of a run folder, a cross-validation folder and a sweep folder: the one owner of each file.

A folder is opened once as a ``RunFolder`` (from its path, which it carries): every file below is read and
written through it. ``run.json``, ``cv.json`` and ``sweep.json`` read as the typed ``RunRecord``,
``CrossValidationRecord`` and ``SweepRecord``, each refused in one line naming the file when it is not one.

A run folder (``train --out RUN``):

- ``run.json``: the ``RunRecord``. Written last after every epoch, it is the commit point: every file it
  names is complete, and a crash at any moment leaves the record of the last finished epoch.
- ``split.json``: train and val image ids and, under ``digests``, the content digest of each (``{"train": [...],
  "val": [...]}``, in the same order) as the cache held it when the run was made; runs made before fishseg
  recorded content, or from a cache that did not record it, lack them. The record holds the file's SHA-256,
  so an edited split is refused.
- ``history.jsonl``: per-iteration and per-epoch values while the run is unfinished, one line an epoch,
  appended (and synced) just before ``run.json`` is written: after a crash it may hold one epoch more or a
  torn last line, which ``RunFolder.read_history`` ignores and a resume cuts away.
- ``history.json``: the whole history in one JSON object, written once the run finishes (the journal then
  goes); run folders of earlier versions hold only this file.
- ``checkpoints/epoch-NNNN.safetensors``: decoder weights + JSON (``fishseg.models.decoders``), written once and
  never modified, so the record's SHA-256 of the best one stays true until the record names another. The JSON
  holds the run's settings, which ``RunFolder.read_record`` checks the record's against.
- ``checkpoints/epoch-NNNN.resume.safetensors``: AdamW moments, scheduler position and RNG states of the
  last epoch (tensors in safetensors, the rest JSON; no pickle), until the run finishes.
- ``.lock``: held (``flock``) by the process training into the folder, and removed when it stops; the kernel drops
  the lock when that process dies (leaving the file), which is how a reader tells a killed run (``running`` in the
  record) from a live one.
- ``report/``: what ``evaluate`` writes (``EVERY_REPORT_FILE``: the scores, pages and figures, drawn by
  ``fishseg.evaluation.report``); removed when the run is replaced or trains on, since it would describe another run.

A cross-validation folder holds ``cv.json`` and one run folder per fold (``fold-k``); a sweep folder holds
``sweep.json`` and one run or cross-validation folder per config. ``sweep.json`` records the cache (its path
absolute), the grid, the configs and, under ``failed``, the configs whose training failed with the reason
(a rerun skips them unless asked to retry). A run whose training failed (a non-finite loss) says so itself:
``run.json``'s status is ``failed`` and ``failure`` holds why; such a run is not resumed (a resume continues it
exactly as it went, so it would fail the same way), only replaced. A folder holds one kind (``RunFolder.kind``): no command writes a
run into a cross-validation or sweep folder, or the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from torch import nn

from fishseg.version import __version__
from fishseg.config import TrainConfig, shown_setting
from fishseg.errors import FishsegError
from fishseg.models.decoders import CheckpointMeta, load_checkpoint, read_checkpoint_meta, save_checkpoint
from fishseg.runtime import UNRECORDED, atomic_path, file_digest, make_output_dir, read_json, write_json

__all__ = ["ANALYSIS_FILES", "CHECKPOINT_DIR", "CLASS_ANALYSIS_FILES", "CURVE_FILES", "CV_FILE", "CV_KIND",
           "EPOCHS_CSV", "EVERY_REPORT_FILE", "FAILED", "FINISHED", "GALLERY_FILES", "HISTORY_FILE",
           "HISTORY_JOURNAL", "INTERRUPTED", "METRICS_FILE", "PER_IMAGE_FILE", "REPORT_DIR", "REPORT_FILES",
           "REPORT_HTML", "REPORT_MD", "RUN_FILE", "RUN_KIND", "RUNNING", "SPLIT_FILE", "SWEEP_FILE", "SWEEP_KIND",
           "CheckpointRef", "CrossValidationRecord", "RunFolder", "RunRecord", "SweepEntry", "SweepRecord",
           "check_resume_flags", "differing_fields", "empty_history", "history_entry"]

logger = logging.getLogger(__name__)

RUN_FILE, SPLIT_FILE, HISTORY_FILE, LOCK_FILE = "run.json", "split.json", "history.json", ".lock"
RESTORE_ADVICE = "restore it, or train again with `overwrite=True`"  # for a run's file that is damaged or missing
HISTORY_JOURNAL = "history.jsonl"
CHECKPOINT_DIR, REPORT_DIR = "checkpoints", "report"
METRICS_FILE, PER_IMAGE_FILE = "metrics.json", "per_image.csv"  # a report's scores: what `compare` reads back
REPORT_MD, REPORT_HTML, EPOCHS_CSV = "report.md", "report.html", "epochs.csv"
CURVE_FILES = ("01_train_iteration_loss.png", "02_train_iteration_iou.png", "03_epoch_loss.png",
               "04_val_iteration_loss.png", "05_epoch_iou.png", "06_val_iteration_iou.png")
ANALYSIS_FILES = {"per_class": "07_per_class.png", "histogram": "08_iou_histogram.png",
                  "threshold": "09_threshold_sweep.png", "pca": "10_feature_pca.png", "probe": "11_species_probe.png"}
GALLERY_FILES = {"random": "gallery_1_random.png", "best": "gallery_2_best.png", "worst": "gallery_3_worst.png"}
CLASS_ANALYSIS_FILES = {"pixel_confusion": "12_pixel_confusion.png"}  # only a report of a run with several classes
REPORT_FILES = (METRICS_FILE, PER_IMAGE_FILE, REPORT_MD, REPORT_HTML, EPOCHS_CSV, *CURVE_FILES,
                *ANALYSIS_FILES.values(), *GALLERY_FILES.values())  # the files of a binary run's report
EVERY_REPORT_FILE = (*REPORT_FILES, *CLASS_ANALYSIS_FILES.values())  # every file evaluate may write into a report
CV_FILE, SWEEP_FILE = "cv.json", "sweep.json"
RUNNING, FINISHED, INTERRUPTED, FAILED = "running", "finished", "interrupted", "failed"
STATE_KEY = "fishseg_resume"  # safetensors metadata entry of a resume file


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A file of the run folder that the record vouches for."""

    epoch: int
    file: str  # relative to the run folder
    sha256: str


@dataclasses.dataclass
class RunRecord:
    """``run.json``: what produced the run, how far it got and which checkpoints are its best and last."""

    train_config: TrainConfig
    cache: dict[str, Any]  # FeatureCache.summary(): path, fingerprint, backbone, image size, images
    backbone: dict[str, Any]  # the cache's BackboneInfo
    extract_config: dict[str, Any]  # how to preprocess new images (predict)
    split: dict[str, Any]  # method, sizes, groups, val images with a near-duplicate in train, fold
    features: str  # "in memory" or "streamed from HDF5" (of the latest session)
    device: str
    processes: int
    precision: str = UNRECORDED  # the decoder's (fp32, bf16, fp16) in the latest session; older runs: unrecorded
    deterministic: bool = False  # whether the latest session ran with deterministic algorithms only
    compiled: bool = False  # whether the latest session ran the decoder through torch.compile
    split_sha256: str = UNRECORDED  # of split.json as written; runs before it: unrecorded (unchecked)
    status: str = RUNNING
    failure: str = ""  # why training failed (status "failed": a non-finite loss, say); "" otherwise
    epochs_done: int = 0
    best_epoch: int = 0
    best_val_iou: float = -1.0
    train_seconds: float = 0.0  # inside epochs, summed over sessions
    checkpoints: dict[str, CheckpointRef] = dataclasses.field(default_factory=dict)  # best, last, resume
    fishseg_version: str = __version__
    created_at: str = dataclasses.field(default_factory=lambda: _now())

    @property
    def epochs_planned(self) -> int:
        return self.train_config.epochs

    @property
    def score_name(self) -> str:
        """What ``best_val_iou`` measures: "IoU", the validation images' mean IoU (binary masks), or "mIoU", their
        dataset mIoU (several pixel classes; runs before classes were recorded are binary)."""
        return "IoU" if self.extract_config.get("mask_format", "binary") == "binary" else "mIoU"

    def describe(self) -> str:
        """E.g. "finished, 20 of 20 epochs, best val IoU 0.7812 at epoch 14"."""
        best = (f", best val {self.score_name} {self.best_val_iou:.4f} at epoch {self.best_epoch}"
                if self.epochs_done else "")
        return f"{self.status}, {self.epochs_done} of {self.epochs_planned} epochs{best}"

    def refuse_if_failed(self, run_dir: Path) -> None:
        """A failed run is final: a resume continues exactly as the run went, so it would fail the same way."""
        if self.status == FAILED:
            raise FishsegError(f"{run_dir}: its training failed in epoch {self.epochs_done + 1} of "
                               f"{self.epochs_planned}: {self.failure}; a resume would repeat that (it continues "
                               f"the run exactly as it went): train it again with other settings and "
                               f"`overwrite=True`, or into another `out`")

    def to_json(self) -> dict[str, Any]:
        data = json.loads(json.dumps(dataclasses.asdict(self)))  # as it reads back (tuples become lists)
        return {**data, "epochs_planned": self.epochs_planned}

    @classmethod
    def from_json(cls, data: Any, source: Path) -> RunRecord:
        """The record in ``data`` (as read from ``source``); anything else is refused naming the file."""
        try:
            fields = {field.name for field in dataclasses.fields(cls)}
            values = {key: value for key, value in data.items() if key in fields}
            values["train_config"] = TrainConfig(**data["train_config"])
            values["checkpoints"] = {role: CheckpointRef(**ref) for role, ref in data.get("checkpoints", {}).items()}
            return cls(**values)
        except (AttributeError, KeyError, TypeError, FishsegError) as error:
            raise FishsegError(f"{source}: not a fishseg run record ({error}); restore it, or replace the run "
                               f"with `overwrite=True`") from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _not_a(path: Path, kind: str, problem: str) -> FishsegError:
    """The refusal of a folder's record file that is not one (cv.json, sweep.json)."""
    return FishsegError(f"{path}: not a fishseg {kind} ({problem}); restore it, or use `overwrite=True` or another `out`")


def _object_with(data: Any, keys: tuple[str, ...], path: Path, kind: str) -> dict[str, Any]:
    """``data`` as a JSON object holding ``keys``; anything else is refused naming the file."""
    if not isinstance(data, dict) or not set(keys) <= set(data):
        raise _not_a(path, kind, f"it needs {', '.join(keys)}")
    return data


def _train_config(data: Any, path: Path, kind: str, where: str = "train_config") -> TrainConfig:
    """The TrainConfig a record file holds at ``where``; one that does not make one is refused naming the file."""
    try:
        return TrainConfig(**data)
    except (TypeError, FishsegError) as error:
        raise _not_a(path, kind, f"{where}: {error}") from None


FoldScores = Mapping[str, Any]  # fold (1-based), n_images, val_with_duplicate_in_train and the CV metrics


@dataclasses.dataclass(frozen=True)
class CrossValidationRecord:
    """``cv.json``: the settings of a K-fold cross-validation, how far it got, each fold's scores once scored and
    their mean ± std over folds."""

    train_config: TrainConfig  # fold 0's (fold k trains with fold=k)
    status: str = RUNNING
    folds: tuple[FoldScores | None, ...] = ()  # per fold: None until it is scored
    summary: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)  # metric → mean, std

    @classmethod
    def start(cls, config: TrainConfig) -> CrossValidationRecord:
        return cls(config, RUNNING, (None,) * config.folds)

    @property
    def scored(self) -> int:
        """Folds scored so far."""
        return sum(1 for scores in self.folds if scores)

    def with_fold(self, fold: int, scores: FoldScores) -> CrossValidationRecord:
        """This record with 0-based ``fold`` scored."""
        return dataclasses.replace(self, folds=tuple(scores if k == fold else old for k, old in enumerate(self.folds)))

    def to_json(self) -> dict[str, Any]:
        return {"train_config": dataclasses.asdict(self.train_config), "status": self.status,
                "folds": list(self.folds), "summary": dict(self.summary)}

    @classmethod
    def from_json(cls, data: Any, source: Path) -> CrossValidationRecord:
        """The record in ``data`` (as read from ``source``); anything else is refused naming the file."""
        kind = "cross-validation record"
        data = _object_with(data, ("train_config", "status", "folds"), source, kind)
        config = _train_config(data["train_config"], source, kind)
        folds, summary = data["folds"], data.get("summary", {})
        if not isinstance(data["status"], str) or not isinstance(summary, dict):
            raise _not_a(source, kind, "status needs a word and summary an object")
        if not isinstance(folds, list) or len(folds) != config.folds \
                or not all(scores is None or isinstance(scores, dict) for scores in folds):
            raise _not_a(source, kind, f"folds needs {config.folds} entries, each an object or null")
        return cls(config, data["status"], tuple(folds), summary)


@dataclasses.dataclass(frozen=True)
class SweepEntry:
    """One config of a sweep: the folder it trains into (under the sweep folder) and its settings."""

    name: str  # named by the fields that vary, e.g. decoder=linear,lr=0.0003
    config: TrainConfig


@dataclasses.dataclass(frozen=True)
class SweepRecord:
    """``sweep.json``: the cache (its path absolute), the grid, its configs and those whose training failed."""

    cache: Mapping[str, Any]  # FeatureCache.summary() with the absolute path, as run.json holds it
    grid: Mapping[str, list[Any]]  # field → values, as given
    configs: tuple[SweepEntry, ...]
    folds: int = 0  # K of every config's cross-validation (0: one run each)
    failed: Mapping[str, str] = dataclasses.field(default_factory=dict)  # config → why (older sweeps: none)
    fishseg_version: str = __version__

    def with_failure(self, name: str, reason: str) -> SweepRecord:
        return dataclasses.replace(self, failed={**self.failed, name: reason})

    def to_json(self) -> dict[str, Any]:
        return {"fishseg_version": self.fishseg_version, "cache": dict(self.cache), "folds": self.folds,
                "grid": dict(self.grid),
                "configs": [{"name": entry.name, "train_config": dataclasses.asdict(entry.config)}
                            for entry in self.configs], "failed": dict(self.failed)}

    @classmethod
    def from_json(cls, data: Any, source: Path) -> SweepRecord:
        """The record in ``data`` (as read from ``source``); anything else is refused naming the file."""
        kind = "sweep record"
        data = _object_with(data, ("cache", "grid", "configs"), source, kind)
        configs, failed = data["configs"], data.get("failed", {})
        if not isinstance(data["cache"], dict) or not isinstance(data["grid"], dict) or not isinstance(failed, dict) \
                or not isinstance(configs, list) \
                or not all(isinstance(entry, dict) and {"name", "train_config"} <= set(entry) for entry in configs):
            raise _not_a(source, kind, "cache, grid and failed need objects, configs a list of name and train_config")
        entries = tuple(SweepEntry(str(entry["name"]), _train_config(entry["train_config"], source, kind,
                                                                     f"config {entry['name']}"))
                        for entry in configs)
        return cls(data["cache"], data["grid"], entries, int(data.get("folds", 0)), failed,
                   str(data.get("fishseg_version", UNRECORDED)))


RUN_KIND, CV_KIND, SWEEP_KIND = "run", "cross-validation", "sweep"
_KIND_FILES = ((SWEEP_KIND, SWEEP_FILE), (CV_KIND, CV_FILE), (RUN_KIND, RUN_FILE))


def _holding(kind: str) -> str:
    """E.g. "a sweep (sweep.json)": what a folder of ``kind`` holds, as messages name it."""
    return f"a {kind} ({dict(_KIND_FILES)[kind]})"


EPOCH_KEYS = ("epoch", "train_loss", "train_loss_std", "train_iou", "train_iou_std", "val_loss", "val_loss_std",
              "val_iou", "val_iou_std", "seconds")  # a row of history["epochs"] (train.epoch_summary)
ITERATION_KEYS = ("epoch", "step", "loss", "iou")  # a row of history["iterations"][split]
SPLITS = ("train", "val")
OWN_CHECKPOINT = re.compile(r"epoch-\d{4}(\.resume)?\.safetensors")
OWN_TEMPORARY = re.compile(r"\.(epoch-\d{4}(\.resume)?\.safetensors|run\.json|history\.jsonl?|split\.json)\.\w+\.tmp")


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """An output folder of ``train`` or ``sweep`` (``--out``), opened once from its path: what it holds (a run,
    a cross-validation or a sweep: ``kind``) and every file of it is read and written here, the path carried
    along. Making one reads nothing; a folder that does not exist yet is one to be written."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    # What the folder holds

    @property
    def kind(self) -> str | None:
        """What the folder holds: a run, a cross-validation, a sweep, or None (nothing of fishseg's)."""
        return next((kind for kind, name in _KIND_FILES if (self.path / name).is_file()), None)

    @property
    def holds_run(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    @property
    def holds_cv(self) -> bool:
        return (self.path / CV_FILE).is_file()

    @property
    def holds_sweep(self) -> bool:
        return (self.path / SWEEP_FILE).is_file()

    @property
    def keeps_a_run(self) -> bool:
        """Whether the folder keeps a run to go on from: its own, a cross-validation's fold, or a sweep config's (or
        its fold). A stopped run keeps its record only once an epoch has finished (``train._after_stop``)."""
        return any(any(self.path.glob(pattern)) for pattern in (RUN_FILE, f"*/{RUN_FILE}", f"*/*/{RUN_FILE}"))

    def require_kind(self, wanted: str) -> None:
        """Refuse to write a ``wanted`` into a folder that holds another kind: --overwrite replaces a run by a run,
        never a sweep or a cross-validation by a run (their results would be orphaned and misread)."""
        kind = self.kind
        if kind not in (None, wanted):
            raise FishsegError(f"{self.path}: holds {_holding(kind)}, not a {wanted}; use another `out`, or remove the "
                               f"folder first")

    def require_no_kind(self, writes: str) -> None:
        """Refuse to write ``writes`` (predictions, a report) into a folder that holds a run, a cross-validation or a
        sweep: their files would mix with the folder's own, and the folder's commands would misread them."""
        kind = self.kind
        if kind is not None:
            raise FishsegError(f"{self.path}: holds {_holding(kind)}; write the {writes} into another `out`")

    def fold(self, fold: int) -> RunFolder:
        """The run folder of 0-based ``fold`` of the cross-validation here."""
        return RunFolder(self.path / f"fold-{fold + 1}")

    def runs(self) -> list[RunFolder]:
        """The run folders of what the folder holds: itself (a run), or the folds of its cross-validation."""
        return [self.fold(fold) for fold in range(self.read_cv().train_config.folds)] if self.holds_cv else [self]

    def recorded_config(self) -> TrainConfig | None:
        """The settings of the run or cross-validation here, or None when it holds neither."""
        if self.holds_run:
            return self.read_record().train_config
        if self.holds_cv:
            return self.read_cv().train_config
        return None

    def training_failure(self) -> str | None:
        """Why the training of the run (or of a fold of the cross-validation) here failed, as its ``run.json``
        records it; None when it did not fail (or holds neither)."""
        for run in self.runs():
            record = run.read_record() if run.holds_run else None
            if record is not None and record.status == FAILED:
                return record.failure if run == self else f"{run.path.name}: {record.failure}"
        return None

    # The run's record

    def read_record(self) -> RunRecord:
        """The record of the run, with the status a reader should believe: a ``running`` run whose lock nobody holds
        was killed, and reads as ``interrupted``. Its settings are refused when they are not those its best
        checkpoint was trained with (an edited record would put one decoder's name on another's numbers in
        leaderboards and reports)."""
        if not self.holds_run:
            kind = self.kind
            holds = _holding(kind) if kind else f"no {RUN_FILE}"
            raise FishsegError(f"{self.path}: not a run folder ({holds}); pass the `out` folder of fishseg train"
                               + (" (a fold-k or config folder inside it is one)" if kind else ""))
        record = RunRecord.from_json(read_json(self.path / RUN_FILE), self.path / RUN_FILE)
        self._check_settings(record)
        if record.status == RUNNING and not self.locked:
            record.status = INTERRUPTED
        return record

    def _check_settings(self, record: RunRecord) -> None:
        """The record's train_config against the one its best checkpoint carries, field by field (a checkpoint of
        an earlier version carries fewer fields). A missing best checkpoint is ``verified``'s to report where it
        is read."""
        best = record.checkpoints.get("best")
        if best is None or not (self.path / best.file).is_file():
            return
        held = read_checkpoint_meta(self.path / best.file).train_config
        said = json.loads(json.dumps(dataclasses.asdict(record.train_config)))  # as JSON holds it
        differing = [name for name in said if name in held and held[name] != said[name]]
        if differing:
            says = ", ".join(f"{name} {shown_setting(name, said[name])}" for name in differing)
            holds = ", ".join(f"{name} {shown_setting(name, held[name])}" for name in differing)
            raise FishsegError(f"{self.path / RUN_FILE}: says {says} but {best.file} was trained with {holds}; "
                               f"restore {RUN_FILE}, or train again with `overwrite=True`")

    def write_record(self, record: RunRecord) -> None:
        write_json(self.path / RUN_FILE, record.to_json())

    # History

    def read_history(self, record: RunRecord) -> dict[str, Any]:
        """The history of the record's finished epochs, from the journal of an unfinished run or from
        history.json (either may be an epoch ahead of the record after a crash). A missing or malformed file is
        refused naming it: the report's curves and epoch log are drawn from it, and must never be made up."""
        done, path = record.epochs_done, self._history_path()
        if path is None:
            if not done:
                return empty_history()
            raise FishsegError(f"{self.path}: {HISTORY_FILE} is missing (and no {HISTORY_JOURNAL}), though "
                               f"{RUN_FILE} records {done} finished epochs; restore it (the run's curves and epoch "
                               f"log are drawn from it), or train again with `overwrite=True`")
        history = _joined(_journal_entries(path), path) if path.name == HISTORY_JOURNAL else read_json(path)
        problem = _history_problem(history, done)
        if problem:
            raise FishsegError(f"{path}: not a fishseg history ({problem}); restore it, or train again with "
                               f"`overwrite=True`")
        return {"epochs": history["epochs"][:done],
                "iterations": {split: [row for row in history["iterations"][split] if row["epoch"] <= done]
                               for split in SPLITS}}

    def _history_path(self) -> Path | None:
        """The journal while it exists, else history.json, else None."""
        return next((path for path in (self.path / HISTORY_JOURNAL, self.path / HISTORY_FILE) if path.is_file()),
                    None)

    def cut_history(self, record: RunRecord) -> None:
        """Before a resume appends to it: the journal holds the record's finished epochs and nothing more (no
        epoch a crash left ahead, no torn line), whichever file held them."""
        history = self.read_history(record)
        entries = [history_entry(row, {split: [step for step in rows if step["epoch"] == row["epoch"]]
                                       for split, rows in history["iterations"].items()})
                   for row in history["epochs"]]
        with atomic_path(self.path / HISTORY_JOURNAL) as tmp:
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")

    # Split

    def read_split(self, record: RunRecord | None = None) -> dict[str, list[str]]:
        """The train and val image ids, refused when split.json is not the file the run was trained with (its
        SHA-256 differs from the record's, ``record`` or the folder's): an edited split would score training
        images as validation."""
        record = record or self.read_record()
        path = self.path / SPLIT_FILE
        if record.split_sha256 != UNRECORDED and path.is_file() and file_digest(path) != record.split_sha256:
            raise FishsegError(f"{path}: not the split the run was trained on (its SHA-256 differs from the one in "
                               f"{RUN_FILE}); {RESTORE_ADVICE}")
        split = read_json(path, RESTORE_ADVICE)
        return {name: split[name] for name in SPLITS}

    def split_digests(self, names: tuple[str, ...] = SPLITS) -> dict[str, str] | None:
        """Image id → content digest of the run's images of splits ``names`` when it was made; None where
        unrecorded."""
        split = read_json(self.path / SPLIT_FILE, RESTORE_ADVICE)
        if "digests" not in split:
            return None
        return {image_id: digest for name in names for image_id, digest in zip(split[name], split["digests"][name])}

    def write_split(self, train_ids: list[str], val_ids: list[str], digests: Mapping[str, str] | None = None) -> str:
        """Write split.json; returns its SHA-256, for the record. ``digests``: the cache's (image id → content
        digest; None when it recorded none)."""
        split: dict[str, Any] = {"train": train_ids, "val": val_ids}
        if digests is not None:
            split["digests"] = {name: [digests[image_id] for image_id in split[name]] for name in SPLITS}
        write_json(self.path / SPLIT_FILE, split)
        return file_digest(self.path / SPLIT_FILE)

    # Checkpoints

    def _checkpoint_path(self, epoch: int, kind: str = "") -> Path:
        return self.path / CHECKPOINT_DIR / f"epoch-{epoch:04d}{kind}.safetensors"

    def _reference(self, path: Path, epoch: int) -> CheckpointRef:
        return CheckpointRef(epoch, path.relative_to(self.path).as_posix(), file_digest(path))

    def write_checkpoint(self, epoch: int, decoder: nn.Module, meta: CheckpointMeta) -> CheckpointRef:
        """The decoder after ``epoch``, written once (atomically) and referenced by its SHA-256."""
        path = self._checkpoint_path(epoch)
        with atomic_path(path) as tmp:
            save_checkpoint(tmp, decoder, dataclasses.replace(meta, epoch=epoch))
        return self._reference(path, epoch)

    def verified(self, ref: CheckpointRef) -> Path:
        """The path of ``ref``, refused when the file is missing or its bytes differ from the record's SHA-256."""
        path = self.path / ref.file
        if not path.is_file():
            raise FishsegError(f"{path}: missing, though {self.path / RUN_FILE} names it; train again or restore it")
        if file_digest(path) != ref.sha256:
            raise FishsegError(f"{path}: does not match the SHA-256 recorded in {RUN_FILE} (modified or replaced); "
                               f"train again or restore the file")
        return path

    def verify_files(self, record: RunRecord) -> None:
        """Every checkpoint the record names and the split are the files it was written with."""
        for ref in record.checkpoints.values():
            self.verified(ref)
        self.read_split(record)

    def load(self) -> tuple[RunRecord, nn.Module, CheckpointMeta]:
        """The record, the best decoder and its checkpoint metadata; a modified checkpoint is refused. The best
        decoder of a failed run is from before it failed, which the user is told."""
        record = self.read_record()
        if "best" not in record.checkpoints:
            raise FishsegError(f"{self.path}: no epoch has finished yet ({record.describe()}); "
                               f"let training finish an epoch, or resume it (fishseg train with `resume=True`)")
        if record.status == FAILED:
            logger.warning("%s: its training failed in epoch %d of %d (%s); using its best checkpoint, of epoch %d, "
                           "from before it failed", self.path, record.epochs_done + 1, record.epochs_planned,
                           record.failure, record.best_epoch)
        decoder, meta = load_checkpoint(self.verified(record.checkpoints["best"]))
        return record, decoder, meta

    # Resume state

    def write_resume_state(self, epoch: int, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                           generator: torch.Generator) -> CheckpointRef:
        """What continuing after ``epoch`` needs beyond the decoder: AdamW moments and step counts, the
        scheduler position, the batch-order/augmentation generator and torch's global RNG."""
        optimizer_state = optimizer.state_dict()
        tensors = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        other: dict[str, Any] = {}
        for index, state in optimizer_state["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    other[f"{index}.{key}"] = value
        meta = {"epoch": epoch, "param_groups": optimizer_state["param_groups"], "optimizer_other": other,
                "scheduler": scheduler.state_dict() if scheduler is not None else None}
        path = self._checkpoint_path(epoch, ".resume")
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata={STATE_KEY: json.dumps(meta)})
        return self._reference(path, epoch)

    def read_resume_state(self, record: RunRecord, optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler | None, generator: torch.Generator) -> None:
        """Restore what ``write_resume_state`` saved after the record's last finished epoch."""
        path = self.verified(record.checkpoints["resume"])
        try:
            with safetensors.safe_open(str(path), framework="pt") as file:
                meta = json.loads(file.metadata()[STATE_KEY])
            tensors = safetensors.torch.load_file(str(path))
        except (OSError, safetensors.SafetensorError, KeyError, ValueError) as error:
            raise FishsegError(f"{path}: not a fishseg resume file ({error})") from None
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        for name, value in meta["optimizer_other"].items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        generator.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_rng"])

    # Commit and clean up

    def commit_epoch(self, record: RunRecord, entry: dict[str, Any]) -> None:
        """Make the epoch the record now describes the run's state: its history line appended first, then the
        record (the commit point); a finished run's history then becomes history.json. Last, drop the
        checkpoint files the record no longer names. Only the lock holder calls this, so no other writer's temp
        file is touched."""
        _append_line(self.path / HISTORY_JOURNAL, entry)
        self.write_record(record)
        if record.status == FINISHED:
            write_json(self.path / HISTORY_FILE, self.read_history(record))
            (self.path / HISTORY_JOURNAL).unlink()
        named = {ref.file for ref in record.checkpoints.values()}
        for path in self._own_files():
            if path.relative_to(self.path).as_posix() not in named:
                path.unlink(missing_ok=True)

    def _own_files(self) -> list[Path]:
        """The checkpoint files fishseg writes into a run folder and the temp files a killed writer may have left:
        never a file of the user's that happens to sit there."""
        checkpoints = self.path / CHECKPOINT_DIR
        found = [path for path in self.path.iterdir() if OWN_TEMPORARY.fullmatch(path.name)] \
            if self.path.is_dir() else []
        if checkpoints.is_dir():
            found += [path for path in checkpoints.iterdir()
                      if OWN_CHECKPOINT.fullmatch(path.name) or OWN_TEMPORARY.fullmatch(path.name)]
        return found

    def clear(self) -> None:
        """Remove the files fishseg wrote for a run (``--overwrite``): the record, split, history, checkpoints and
        the report, so nothing stale is read as the new run's. Nothing else is touched."""
        for path in (*(self.path / name for name in (RUN_FILE, SPLIT_FILE, HISTORY_FILE, HISTORY_JOURNAL, CV_FILE)),
                     *self._own_files()):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept when something else is in it
            (self.path / CHECKPOINT_DIR).rmdir()
        self.clear_report()

    def clear_report(self) -> None:
        """Remove the report ``evaluate`` wrote into the run's ``report/`` (``EVERY_REPORT_FILE``): once the run
        changes (replaced, or trained on by a resume) it describes another run. Other files there stay."""
        for name in EVERY_REPORT_FILE:
            (self.path / REPORT_DIR / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept when something else is in it, or absent
            (self.path / REPORT_DIR).rmdir()

    # The training lock

    @property
    def locked(self) -> bool:
        """Whether a live process holds the folder's training lock."""
        try:
            handle = open(self.path / LOCK_FILE, "rb")
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock while training into it; a second trainer is refused, not interleaved. The lock
        file goes when the lock is released (a killed holder leaves it, harmless: nobody holds it)."""
        path = make_output_dir(self.path) / LOCK_FILE
        handle = _take_lock(path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: a trainer that opened this file finds it gone, and retries
            handle.close()

    # Cross-validation and sweep records

    # Cross-validation and sweep records

    def read_cv(self) -> CrossValidationRecord:
        """The cross-validation record here, with the status a reader should believe (as ``read_record``): a
        ``running`` one whose lock nobody holds was stopped, and reads as ``interrupted``."""
        cv = CrossValidationRecord.from_json(read_json(self.path / CV_FILE), self.path / CV_FILE)
        return dataclasses.replace(cv, status=INTERRUPTED) if cv.status == RUNNING and not self.locked else cv

    def write_cv(self, cv: CrossValidationRecord) -> None:
        write_json(self.path / CV_FILE, cv.to_json())

    def read_sweep(self) -> SweepRecord:
        return SweepRecord.from_json(read_json(self.path / SWEEP_FILE), self.path / SWEEP_FILE)

    def write_sweep(self, sweep: SweepRecord) -> None:
        write_json(self.path / SWEEP_FILE, sweep.to_json())

    def config(self, name: str) -> RunFolder:
        """The folder of the sweep's config ``name``."""
        return RunFolder(self.path / name)

    def sweep_digests(self) -> dict[str, str] | None:
        """The content the sweep's runs were made from (image id → digest), as the first of its configs trained so
        far recorded it (a cross-validation's first fold: every fold's split holds every image); None if none
        did."""
        for entry in self.read_sweep().configs:
            folder = self.config(entry.name)
            run = folder.fold(0) if folder.holds_cv else folder
            if (run.path / SPLIT_FILE).is_file():
                return run.split_digests()
        return None

    def config_failures(self, names: Sequence[str]) -> dict[str, str]:
        """Name → why the training in the folder ``name`` here failed, as its own run records say or, where this is
        a sweep, as ``sweep.json`` lists it (``sweep.json`` is read once); names that did not fail are left out."""
        listed = self.read_sweep().failed if self.holds_sweep else {}
        found = {name: self.config(name).training_failure() for name in names}
        return {name: found[name] or listed[name] for name in names if found[name] is not None or name in listed}

    def record_failed_config(self, name: str, reason: str) -> None:
        """Add the failure of config ``name`` to ``sweep.json``, at once, so that it outlives a later Ctrl-C."""
        self.write_sweep(self.read_sweep().with_failure(name, reason))


def _history_problem(history: Any, done: int) -> str | None:
    """What is wrong with ``history`` as the history of ``done`` finished epochs, or None."""
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list) \
            or not isinstance(history.get("iterations"), dict):
        return "it needs an object with epochs and iterations"
    if len(history["epochs"]) < done:
        return f"it holds {len(history['epochs'])} epochs, {RUN_FILE} records {done} finished"
    tables = {"epochs": (history["epochs"][:done], EPOCH_KEYS),
              **{f"iterations {split}": (history["iterations"].get(split), ITERATION_KEYS) for split in SPLITS}}
    for name, (rows, keys) in tables.items():
        if not isinstance(rows, list) or not all(_holds_numbers(row, keys) for row in rows):
            return f"each row of {name} needs the numbers {', '.join(keys)}"
    return None


def _holds_numbers(row: Any, keys: tuple[str, ...]) -> bool:
    return isinstance(row, dict) and all(type(row.get(key)) in (int, float) for key in keys)  # bool is no number


def history_entry(row: dict[str, float], iterations: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """One epoch's line of the journal: its summary row and its per-iteration rows of each split."""
    return {"epoch": row, "iterations": iterations}


def _journal_entries(path: Path) -> list[dict[str, Any]]:
    """The journal's complete lines; a torn last line (a crash in the middle of an append) ends it."""
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            break
    return entries


def _joined(entries: list[Any], path: Path) -> dict[str, Any]:
    history = empty_history()
    for entry in entries:
        if not (isinstance(entry, dict) and "epoch" in entry and isinstance(entry.get("iterations"), dict)
                and all(isinstance(rows, list) for rows in entry["iterations"].values())):
            raise FishsegError(f"{path}: not a fishseg history journal (a line is not an epoch's entry); "
                               f"{RESTORE_ADVICE}")
        history["epochs"].append(entry["epoch"])
        for split, rows in entry["iterations"].items():
            history["iterations"].setdefault(split, []).extend(rows)
    return history


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    """One JSON line at the end of ``path``, on disk before this returns."""
    with open(path, "ab") as handle:
        handle.write(json.dumps(entry).encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def empty_history() -> dict[str, Any]:
    return {"iterations": {"train": [], "val": []}, "epochs": []}


def check_resume_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise FishsegError("`resume=True` and `overwrite=True` exclude each other: continue the run, or replace it")


def _take_lock(path: Path) -> BinaryIO:
    """The open lock file ``path``, flocked. A holder removes the file as it releases it: a lock taken on a file
    that is no longer at ``path`` (removed, or made anew by the next trainer) locks nothing, so it is taken again
    on the file that is."""
    while True:
        handle = open(path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FishsegError(f"{path.parent}: another process is training into this folder; wait for it or stop it "
                               f"first") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        handle.close()


def differing_fields(recorded: TrainConfig, requested: TrainConfig) -> list[str]:
    """``name recorded → requested`` for every config field that differs."""
    old, new = dataclasses.asdict(recorded), dataclasses.asdict(requested)
    return [f"{name} {shown_setting(name, old[name])} → {shown_setting(name, new[name])}" for name in old
            if old[name] != new[name]]
