"""The formats of a run folder, a cross-validation folder and a sweep folder: the one owner of each file.

A run folder (``train --out RUN``):

- ``run.json``: the ``RunRecord``. Written last after every epoch, it is the commit point: every file it
  names is complete, and a crash at any moment leaves the record of the last finished epoch.
- ``split.json``: train and val image ids and, under ``digests``, the content digest of each (``{"train": [...],
  "val": [...]}``, in the same order) as the cache held it when the run was made; runs made before fishseg
  recorded content, or from a cache that did not record it, lack them. The record holds the file's SHA-256,
  so an edited split is refused.
- ``history.jsonl``: per-iteration and per-epoch values while the run is unfinished, one line an epoch,
  appended (and synced) just before ``run.json`` is written: after a crash it may hold one epoch more or a
  torn last line, which ``read_history`` ignores and a resume cuts away.
- ``history.json``: the whole history in one JSON object, written once the run finishes (the journal then
  goes); run folders of earlier versions hold only this file.
- ``checkpoints/epoch-NNNN.safetensors``: decoder weights + JSON (``fishseg.models.decoders``), written once and
  never modified, so the record's SHA-256 of the best one stays true until the record names another. The JSON
  holds the run's settings, which ``read_record`` checks the record's against.
- ``checkpoints/epoch-NNNN.resume.safetensors``: AdamW moments, scheduler position and RNG states of the
  last epoch (tensors in safetensors, the rest JSON; no pickle), until the run finishes.
- ``.lock``: held (``flock``) by the process training into the folder; the kernel drops it when that
  process dies, which is how a reader tells a killed run (``running`` in the record) from a live one.
- ``report/``: what ``evaluate`` writes (``REPORT_FILES``: the scores, pages and figures, drawn by
  ``fishseg.evaluation.report``); removed when the run is replaced or trains on, since it would describe another run.

A cross-validation folder holds ``cv.json`` and one run folder per fold (``fold-k``); a sweep folder holds
``sweep.json`` and one run or cross-validation folder per config. ``sweep.json`` records the cache (its path
absolute), the grid, the configs and, under ``failed``, the configs whose training failed with the reason
(a rerun skips them unless asked to retry). A run whose training failed (a non-finite loss) says so itself:
``run.json``'s status is ``failed`` and ``failure`` holds why; such a run is not resumed (a resume continues it
exactly as it went, so it would fail the same way), only replaced. A folder holds one kind (``folder_kind``): no command writes a
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
from typing import Any, Iterator, Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from torch import nn

from fishseg.version import __version__
from fishseg.config import LAST_BLOCK, TrainConfig, shown_setting
from fishseg.errors import FishsegError
from fishseg.models.decoders import load_checkpoint, read_checkpoint_meta, save_checkpoint
from fishseg.runtime import UNRECORDED, atomic_path, file_digest, make_output_dir, read_json, write_json

logger = logging.getLogger(__name__)

RUN_FILE, SPLIT_FILE, HISTORY_FILE, LOCK_FILE = "run.json", "split.json", "history.json", ".lock"
RESTORE_ADVICE = "restore it, or train again with --overwrite"  # for a run's file that is damaged or missing
HISTORY_JOURNAL = "history.jsonl"
CHECKPOINT_DIR, REPORT_DIR = "checkpoints", "report"
METRICS_FILE, PER_IMAGE_FILE = "metrics.json", "per_image.csv"  # a report's scores: what `compare` reads back
REPORT_MD, REPORT_HTML, EPOCHS_CSV = "report.md", "report.html", "epochs.csv"
CURVE_FILES = ("01_train_iteration_loss.png", "02_train_iteration_iou.png", "03_epoch_loss.png",
               "04_val_iteration_loss.png", "05_epoch_iou.png", "06_val_iteration_iou.png")
ANALYSIS_FILES = {"per_class": "07_per_class.png", "histogram": "08_iou_histogram.png",
                  "threshold": "09_threshold_sweep.png", "pca": "10_feature_pca.png", "probe": "11_species_probe.png"}
GALLERY_FILES = {"random": "gallery_1_random.png", "best": "gallery_2_best.png", "worst": "gallery_3_worst.png"}
REPORT_FILES = (METRICS_FILE, PER_IMAGE_FILE, REPORT_MD, REPORT_HTML, EPOCHS_CSV, *CURVE_FILES,
                *ANALYSIS_FILES.values(), *GALLERY_FILES.values())  # every file evaluate may write into a report
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

    def describe(self) -> str:
        """E.g. "finished, 20 of 20 epochs, best val IoU 0.7812 at epoch 14"."""
        best = f", best val IoU {self.best_val_iou:.4f} at epoch {self.best_epoch}" if self.epochs_done else ""
        return f"{self.status}, {self.epochs_done} of {self.epochs_planned} epochs{best}"

    def refuse_if_failed(self, run_dir: Path) -> None:
        """A failed run is final: a resume continues exactly as the run went, so it would fail the same way."""
        if self.status == FAILED:
            raise FishsegError(f"{run_dir}: its training failed in epoch {self.epochs_done + 1} of "
                               f"{self.epochs_planned}: {self.failure}; a resume would repeat that (it continues "
                               f"the run exactly as it went): train it again with other settings and --overwrite, "
                               f"or into another --out")

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
                               f"with --overwrite") from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def holds_run(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file()


def keeps_a_run(folder: Path) -> bool:
    """Whether ``folder`` keeps a run to go on from: its own, a cross-validation's fold, or a sweep config's (or
    its fold). A stopped run keeps its record only once an epoch has finished (``train._after_stop``)."""
    return any(any(folder.glob(pattern)) for pattern in (RUN_FILE, f"*/{RUN_FILE}", f"*/*/{RUN_FILE}"))


def read_record(run_dir: Path) -> RunRecord:
    """The record of ``run_dir``, with the status a reader should believe: a ``running`` run whose lock
    nobody holds was killed, and reads as ``interrupted``. Its settings are refused when they are not those
    its best checkpoint was trained with (an edited record would put one decoder's name on another's
    numbers in leaderboards and reports)."""
    if not holds_run(run_dir):
        kind = folder_kind(run_dir)
        holds = _holding(kind) if kind else f"no {RUN_FILE}"
        raise FishsegError(f"{run_dir}: not a run folder ({holds}); pass the --out folder of `train`"
                           + (" (a fold-k or config folder inside it is one)" if kind else ""))
    record = RunRecord.from_json(read_json(run_dir / RUN_FILE), run_dir / RUN_FILE)
    _check_settings(run_dir, record)
    if record.status == RUNNING and not is_locked(run_dir):
        record.status = INTERRUPTED
    return record


def _check_settings(run_dir: Path, record: RunRecord) -> None:
    """The record's train_config against the one its best checkpoint carries, field by field (a checkpoint of
    an earlier version carries fewer fields). A missing best checkpoint is ``verified``'s to report where it
    is read."""
    best = record.checkpoints.get("best")
    if best is None or not (run_dir / best.file).is_file():
        return
    held = read_checkpoint_meta(run_dir / best.file).get("train_config", {})
    said = json.loads(json.dumps(dataclasses.asdict(record.train_config)))  # as JSON holds it
    differing = [name for name in said if name in held and held[name] != said[name]]
    if differing:
        says = ", ".join(f"{name} {shown_setting(name, said[name])}" for name in differing)
        holds = ", ".join(f"{name} {shown_setting(name, held[name])}" for name in differing)
        raise FishsegError(f"{run_dir / RUN_FILE}: says {says} but {best.file} was trained with {holds}; restore "
                           f"{RUN_FILE}, or train again with --overwrite")


def write_record(run_dir: Path, record: RunRecord) -> None:
    write_json(run_dir / RUN_FILE, record.to_json())


EPOCH_KEYS = ("epoch", "train_loss", "train_loss_std", "train_iou", "train_iou_std", "val_loss", "val_loss_std",
              "val_iou", "val_iou_std", "seconds")  # a row of history["epochs"] (train.epoch_summary)
ITERATION_KEYS = ("epoch", "step", "loss", "iou")  # a row of history["iterations"][split]


def read_history(run_dir: Path, record: RunRecord) -> dict[str, Any]:
    """The history of the record's finished epochs, from the journal of an unfinished run or from
    history.json (either may be an epoch ahead of the record after a crash). A missing or malformed file is
    refused naming it: the report's curves and epoch log are drawn from it, and must never be made up."""
    done, path = record.epochs_done, _history_path(run_dir)
    if path is None:
        if not done:
            return empty_history()
        raise FishsegError(f"{run_dir}: {HISTORY_FILE} is missing (and no {HISTORY_JOURNAL}), though {RUN_FILE} "
                           f"records {done} finished epochs; restore it (the run's curves and epoch log are drawn "
                           f"from it), or train again with --overwrite")
    history = _joined(_journal_entries(path), path) if path.name == HISTORY_JOURNAL else read_json(path)
    problem = _history_problem(history, done)
    if problem:
        raise FishsegError(f"{path}: not a fishseg history ({problem}); restore it, or train again with --overwrite")
    return {"epochs": history["epochs"][:done],
            "iterations": {split: [row for row in history["iterations"][split] if row["epoch"] <= done]
                           for split in SPLITS}}


def _history_path(run_dir: Path) -> Path | None:
    """The journal while it exists, else history.json, else None."""
    return next((path for path in (run_dir / HISTORY_JOURNAL, run_dir / HISTORY_FILE) if path.is_file()), None)


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
            raise FishsegError(f"{path}: not a fishseg history journal (a line is not an epoch's entry); restore "
                               f"it, or train again with --overwrite")
        history["epochs"].append(entry["epoch"])
        for split, rows in entry["iterations"].items():
            history["iterations"].setdefault(split, []).extend(rows)
    return history


def cut_history(run_dir: Path, record: RunRecord) -> None:
    """Before a resume appends to it: the journal holds the record's finished epochs and nothing more (no
    epoch a crash left ahead, no torn line), whichever file held them."""
    history = read_history(run_dir, record)
    entries = [history_entry(row, {split: [step for step in rows if step["epoch"] == row["epoch"]]
                                   for split, rows in history["iterations"].items()}) for row in history["epochs"]]
    with atomic_path(run_dir / HISTORY_JOURNAL) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    """One JSON line at the end of ``path``, on disk before this returns."""
    with open(path, "ab") as handle:
        handle.write(json.dumps(entry).encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def empty_history() -> dict[str, Any]:
    return {"iterations": {"train": [], "val": []}, "epochs": []}


SPLITS = ("train", "val")


def read_split(run_dir: Path, record: RunRecord | None = None) -> dict[str, list[str]]:
    """The train and val image ids, refused when split.json is not the file the run was trained with (its
    SHA-256 differs from the record's, ``record`` or the folder's): an edited split would score training
    images as validation."""
    record = record or read_record(run_dir)
    path = run_dir / SPLIT_FILE
    if record.split_sha256 != UNRECORDED and path.is_file() and file_digest(path) != record.split_sha256:
        raise FishsegError(f"{path}: not the split the run was trained on (its SHA-256 differs from the one in "
                           f"{RUN_FILE}); {RESTORE_ADVICE}")
    split = read_json(path, RESTORE_ADVICE)
    return {name: split[name] for name in SPLITS}


def split_digests(run_dir: Path, names: tuple[str, ...] = SPLITS) -> dict[str, str] | None:
    """Image id → content digest of the run's images of splits ``names`` when it was made; None where
    unrecorded."""
    split = read_json(run_dir / SPLIT_FILE, RESTORE_ADVICE)
    if "digests" not in split:
        return None
    return {image_id: digest for name in names for image_id, digest in zip(split[name], split["digests"][name])}


def write_split(run_dir: Path, train_ids: list[str], val_ids: list[str],
                digests: Mapping[str, str] | None = None) -> str:
    """Write split.json; returns its SHA-256, for the record. ``digests``: the cache's (image id → content
    digest; None when it recorded none)."""
    split: dict[str, Any] = {"train": train_ids, "val": val_ids}
    if digests is not None:
        split["digests"] = {name: [digests[image_id] for image_id in split[name]] for name in SPLITS}
    write_json(run_dir / SPLIT_FILE, split)
    return file_digest(run_dir / SPLIT_FILE)


def _checkpoint_path(run_dir: Path, epoch: int, kind: str = "") -> Path:
    return run_dir / CHECKPOINT_DIR / f"epoch-{epoch:04d}{kind}.safetensors"


def _reference(run_dir: Path, path: Path, epoch: int) -> CheckpointRef:
    return CheckpointRef(epoch, path.relative_to(run_dir).as_posix(), file_digest(path))


def write_checkpoint(run_dir: Path, epoch: int, decoder: nn.Module, meta: dict[str, Any]) -> CheckpointRef:
    """The decoder after ``epoch``, written once (atomically) and referenced by its SHA-256."""
    path = _checkpoint_path(run_dir, epoch)
    with atomic_path(path) as tmp:
        save_checkpoint(tmp, decoder, {**meta, "epoch": epoch})
    return _reference(run_dir, path, epoch)


def verified(run_dir: Path, ref: CheckpointRef) -> Path:
    """The path of ``ref``, refused when the file is missing or its bytes differ from the record's SHA-256."""
    path = run_dir / ref.file
    if not path.is_file():
        raise FishsegError(f"{path}: missing, though {run_dir / RUN_FILE} names it; train again or restore it")
    if file_digest(path) != ref.sha256:
        raise FishsegError(f"{path}: does not match the SHA-256 recorded in {RUN_FILE} (modified or replaced); "
                           f"train again or restore the file")
    return path


def verify_files(run_dir: Path, record: RunRecord) -> None:
    """Every checkpoint the record names and the split are the files it was written with."""
    for ref in record.checkpoints.values():
        verified(run_dir, ref)
    read_split(run_dir, record)


def load_run(run_dir: Path) -> tuple[RunRecord, nn.Module, dict[str, Any]]:
    """The record, the best decoder and its checkpoint metadata; a modified checkpoint is refused. The best
    decoder of a failed run is from before it failed, which the user is told."""
    record = read_record(run_dir)
    if "best" not in record.checkpoints:
        raise FishsegError(f"{run_dir}: no epoch has finished yet ({record.describe()}); "
                           f"let training finish an epoch, or resume it with `train --resume`")
    if record.status == FAILED:
        logger.warning("%s: its training failed in epoch %d of %d (%s); using its best checkpoint, of epoch %d, "
                       "from before it failed", run_dir, record.epochs_done + 1, record.epochs_planned,
                       record.failure, record.best_epoch)
    decoder, meta = load_checkpoint(verified(run_dir, record.checkpoints["best"]))
    return record, decoder, meta


def checkpoint_layers(meta: dict[str, Any]) -> tuple[int, ...]:
    """The backbone blocks a checkpoint's decoder reads, as its cache names them (before cache format 3: the
    last block only)."""
    return tuple(meta.get("layers", LAST_BLOCK))


def write_resume_state(run_dir: Path, epoch: int, optimizer: torch.optim.Optimizer,
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
    path = _checkpoint_path(run_dir, epoch, ".resume")
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={STATE_KEY: json.dumps(meta)})
    return _reference(run_dir, path, epoch)


def read_resume_state(run_dir: Path, record: RunRecord, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler | None, generator: torch.Generator) -> None:
    """Restore what ``write_resume_state`` saved after the record's last finished epoch."""
    path = verified(run_dir, record.checkpoints["resume"])
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


def commit_epoch(run_dir: Path, record: RunRecord, entry: dict[str, Any]) -> None:
    """Make the epoch the record now describes the run's state: its history line appended first, then the
    record (the commit point); a finished run's history then becomes history.json. Last, drop the
    checkpoint files the record no longer names. Only the lock holder calls this, so no other writer's temp
    file is touched."""
    _append_line(run_dir / HISTORY_JOURNAL, entry)
    write_record(run_dir, record)
    if record.status == FINISHED:
        write_json(run_dir / HISTORY_FILE, read_history(run_dir, record))
        (run_dir / HISTORY_JOURNAL).unlink()
    named = {ref.file for ref in record.checkpoints.values()}
    for path in _own_files(run_dir):
        if path.relative_to(run_dir).as_posix() not in named:
            path.unlink(missing_ok=True)


OWN_CHECKPOINT = re.compile(r"epoch-\d{4}(\.resume)?\.safetensors")
OWN_TEMPORARY = re.compile(r"\.(epoch-\d{4}(\.resume)?\.safetensors|run\.json|history\.jsonl?|split\.json)\.\w+\.tmp")


def _own_files(run_dir: Path) -> list[Path]:
    """The checkpoint files fishseg writes into a run folder and the temp files a killed writer may have left:
    never a file of the user's that happens to sit there."""
    checkpoints = run_dir / CHECKPOINT_DIR
    found = [path for path in run_dir.iterdir() if OWN_TEMPORARY.fullmatch(path.name)] if run_dir.is_dir() else []
    if checkpoints.is_dir():
        found += [path for path in checkpoints.iterdir()
                  if OWN_CHECKPOINT.fullmatch(path.name) or OWN_TEMPORARY.fullmatch(path.name)]
    return found


def clear_run(run_dir: Path) -> None:
    """Remove the files fishseg wrote for a run (``--overwrite``): the record, split, history, checkpoints and
    the report, so nothing stale is read as the new run's. Nothing else is touched."""
    for path in (*(run_dir / name for name in (RUN_FILE, SPLIT_FILE, HISTORY_FILE, HISTORY_JOURNAL, CV_FILE)),
                 *_own_files(run_dir)):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # kept when something else is in it
        (run_dir / CHECKPOINT_DIR).rmdir()
    clear_report(run_dir)


def clear_report(run_dir: Path) -> None:
    """Remove the report ``evaluate`` wrote into the run's ``report/`` (``REPORT_FILES``): once the run changes
    (replaced, or trained on by a resume) it describes another run. Other files there stay."""
    for name in REPORT_FILES:
        (run_dir / REPORT_DIR / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # kept when something else is in it, or absent
        (run_dir / REPORT_DIR).rmdir()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the folder's training lock."""
    if not (run_dir / LOCK_FILE).exists():
        return False
    with open(run_dir / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold the folder's lock while training into it; a second trainer is refused, not interleaved."""
    handle = open(make_output_dir(run_dir) / LOCK_FILE, "a+b")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FishsegError(f"{run_dir}: another process is training into this folder; wait for it or "
                               f"stop it first") from None
        yield
    finally:
        handle.close()


def recorded_config(folder: Path) -> TrainConfig | None:
    """The settings of the run or cross-validation in ``folder``, or None when it holds neither."""
    if holds_run(folder):
        return read_record(folder).train_config
    if holds_cv(folder):
        return TrainConfig(**read_cv(folder)["train_config"])
    return None


def training_failure(folder: Path) -> str | None:
    """Why the training of the run (or of a fold of the cross-validation) in ``folder`` failed, as its
    ``run.json`` records it; None when it did not fail (or holds neither)."""
    runs = [fold_dir(folder, fold) for fold in range(read_cv(folder)["train_config"]["folds"])] \
        if holds_cv(folder) else [folder]
    for run in runs:
        record = read_record(run) if holds_run(run) else None
        if record is not None and record.status == FAILED:
            return record.failure if run == folder else f"{run.name}: {record.failure}"
    return None


def check_resume_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise FishsegError("--resume and --overwrite exclude each other: continue the run, or replace it")


def differing_fields(recorded: TrainConfig, requested: TrainConfig) -> list[str]:
    """``name recorded → requested`` for every config field that differs."""
    old, new = dataclasses.asdict(recorded), dataclasses.asdict(requested)
    return [f"{name} {shown_setting(name, old[name])} → {shown_setting(name, new[name])}" for name in old
            if old[name] != new[name]]


def read_cv(out_dir: Path) -> dict[str, Any]:
    """The cross-validation record of ``out_dir``, with the status a reader should believe (as ``read_record``):
    a ``running`` one whose lock nobody holds was stopped, and reads as ``interrupted``."""
    cv = _read_folder_file(out_dir / CV_FILE, ("train_config", "status", "folds"), "cross-validation record")
    if cv["status"] == RUNNING and not is_locked(out_dir):
        cv["status"] = INTERRUPTED
    return cv


def _read_folder_file(path: Path, keys: tuple[str, ...], kind: str) -> dict[str, Any]:
    """A JSON object holding ``keys``; anything else is refused naming the file."""
    data = read_json(path)
    if not isinstance(data, dict) or not set(keys) <= set(data):
        raise FishsegError(f"{path}: not a fishseg {kind} (it needs {', '.join(keys)}); restore it, or use "
                           f"--overwrite or another --out")
    return data


def write_cv(out_dir: Path, cv: dict[str, Any]) -> None:
    write_json(out_dir / CV_FILE, cv)


def fold_dir(out_dir: Path, fold: int) -> Path:
    """The run folder of 0-based ``fold``."""
    return out_dir / f"fold-{fold + 1}"


def holds_cv(folder: Path) -> bool:
    return (folder / CV_FILE).is_file()


def holds_sweep(folder: Path) -> bool:
    return (folder / SWEEP_FILE).is_file()


RUN_KIND, CV_KIND, SWEEP_KIND = "run", "cross-validation", "sweep"
_KIND_FILES = ((SWEEP_KIND, SWEEP_FILE), (CV_KIND, CV_FILE), (RUN_KIND, RUN_FILE))


def folder_kind(folder: Path) -> str | None:
    """What ``folder`` holds: a run, a cross-validation, a sweep, or None (nothing of fishseg's)."""
    return next((kind for kind, name in _KIND_FILES if (folder / name).is_file()), None)


def _holding(kind: str) -> str:
    """E.g. "a sweep (sweep.json)": what a folder of ``kind`` holds, as messages name it."""
    return f"a {kind} ({dict(_KIND_FILES)[kind]})"


def require_kind(folder: Path, wanted: str) -> None:
    """Refuse to write a ``wanted`` into a folder that holds another kind: --overwrite replaces a run by a run,
    never a sweep or a cross-validation by a run (their results would be orphaned and misread)."""
    kind = folder_kind(folder)
    if kind not in (None, wanted):
        raise FishsegError(f"{folder}: holds {_holding(kind)}, not a {wanted}; use another --out, or remove the "
                           f"folder first")


def require_no_kind(folder: Path, writes: str) -> None:
    """Refuse to write ``writes`` (predictions, a report) into a folder that holds a run, a cross-validation or a
    sweep: their files would mix with the folder's own, and the folder's commands would misread them."""
    kind = folder_kind(folder)
    if kind is not None:
        raise FishsegError(f"{folder}: holds {_holding(kind)}; write the {writes} into another --out")


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    return _read_folder_file(sweep_dir / SWEEP_FILE, ("cache", "grid", "configs"), "sweep record")


def sweep_digests(sweep_dir: Path) -> dict[str, str] | None:
    """The content its runs were made from (image id → digest), as the first of its configs trained so far
    recorded it (a cross-validation's first fold: every fold's split holds every image); None if none did."""
    for config in read_sweep(sweep_dir)["configs"]:
        folder = sweep_dir / config["name"]
        run = fold_dir(folder, 0) if holds_cv(folder) else folder
        if (run / SPLIT_FILE).is_file():
            return split_digests(run)
    return None


def write_sweep(sweep_dir: Path, sweep: dict[str, Any]) -> None:
    write_json(sweep_dir / SWEEP_FILE, sweep)


def failed_configs(sweep: dict[str, Any]) -> dict[str, str]:
    """Config name → why its training failed, as ``sweep.json`` records it (older sweeps record none)."""
    return dict(sweep.get("failed", {}))


def config_failures(parent: Path, names: Sequence[str]) -> dict[str, str]:
    """Name → why the training in ``parent / name`` failed, as its own run records say or, where ``parent`` is a
    sweep, as ``sweep.json`` lists it (``sweep.json`` is read once); names that did not fail are left out."""
    listed = failed_configs(read_sweep(parent)) if holds_sweep(parent) else {}
    found = {name: training_failure(parent / name) for name in names}
    return {name: found[name] or listed[name] for name in names if found[name] is not None or name in listed}


def record_failed_config(sweep_dir: Path, name: str, reason: str) -> None:
    """Add the failure of config ``name`` to ``sweep.json``, at once, so that it outlives a later Ctrl-C."""
    sweep = read_sweep(sweep_dir)
    write_sweep(sweep_dir, {**sweep, "failed": {**failed_configs(sweep), name: reason}})
