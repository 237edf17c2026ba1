"""``fishseg compare``: a leaderboard of runs that says which differences are real.

An entry is a run folder, or a cross-validation folder (one entry, its folds' validation images
pooled); a sweep folder counts as its entries. Entries must share one cache and the same validation
images (cross-validations: the same folds), so that each image pairs the entries' scores. Per-image
scores come from a run's evaluation when it matches the run's best checkpoint, and are computed from
the cache otherwise. Statistics: ``fishseg.stats``; rendering: ``fishseg.leaderboard``.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fishseg.cache import FeatureCache, content_changes
from fishseg.config import TrainConfig, value_text
from fishseg.errors import FishsegError
from fishseg.evaluate import METRICS_FILE, PER_IMAGE_FILE, evaluate_run
from fishseg.leaderboard import LeaderboardEntry, write_leaderboard
from fishseg.runs import (REPORT_DIR, RunRecord, fold_dir, holds_cv, holds_run, holds_sweep, read_cv, read_history,
                          read_record, read_sweep, split_digests)
from fishseg.runtime import make_output_dir, plural, read_json, resolve_device
from fishseg.stats import compare_to_reference

DEFAULT_OUT = Path("compare")
SCORES = ("iou", "dice", "boundary_f")  # per-image columns of per_image.csv that the leaderboard uses


@dataclasses.dataclass
class RunScores:
    """One run's best checkpoint on its validation images."""

    record: RunRecord
    image_ids: list[str]
    per_image: dict[str, np.ndarray]  # SCORES → N
    pooled_iou: float
    val_iou_curve: list[float]


@dataclasses.dataclass
class Entry:
    name: str
    folder: Path
    runs: list[RunScores]  # one, or one per fold

    @property
    def is_cv(self) -> bool:
        return len(self.runs) > 1 or self.runs[0].record.train_config.folds > 0

    @property
    def config(self) -> TrainConfig:
        return dataclasses.replace(self.runs[0].record.train_config, fold=0)

    def scores(self, name: str) -> dict[str, float]:
        """Per image id, over all folds (each image is validated in exactly one fold)."""
        return {image_id: float(value)
                for run in self.runs for image_id, value in zip(run.image_ids, run.per_image[name])}

    def fold_means(self, name: str) -> list[float]:
        return [float(run.per_image[name].mean()) for run in self.runs]


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    out_dir: Path
    entries: list[LeaderboardEntry]  # best first
    reference: str

    def summary(self) -> str:
        best = self.entries[0]
        verdicts = [entry.comparison.verdict for entry in self.entries if entry.comparison is not None]
        real = sum(verdict in ("better", "worse") for verdict in verdicts)
        tested = (f"{real} of {len(verdicts)} differences from {self.reference} are real at 95%" if verdicts
                  else "nothing to compare it with")
        return (f"leaderboard of {plural(len(self.entries), 'entry', 'entries')}: best {best.name} "
                f"(mean IoU {best.mean_iou:.4f}); {tested}: {self.out_dir}")


def default_out(folders: Sequence[Path]) -> Path:
    """The sweep folder when it is all that is compared (its own leaderboard), else ./compare."""
    return folders[0] if len(folders) == 1 and holds_sweep(folders[0]) else DEFAULT_OUT


def entry_folders(folders: Sequence[Path]) -> list[Path]:
    """Run and cross-validation folders, a sweep folder expanded into its configs' folders."""
    found = []
    for folder in folders:
        if holds_sweep(folder):
            names = [config["name"] for config in read_sweep(folder)["configs"]]
            found += [folder / name for name in names if holds_run(folder / name) or holds_cv(folder / name)]
        elif holds_run(folder) or holds_cv(folder):
            found.append(folder)
        elif not folder.exists():
            raise FishsegError(f"{folder}: not found")
        else:
            raise FishsegError(f"{folder}: neither a run, a cross-validation nor a sweep folder "
                               f"(no run.json, cv.json or sweep.json)")
    if not found:
        raise FishsegError(f"{', '.join(map(str, folders))}: no runs to compare yet")
    return list(dict.fromkeys(found))


def _entry_names(folders: list[Path]) -> list[str]:
    """Folder names, with the parent's name added where two would clash."""
    names = [folder.name for folder in folders]
    return [f"{folder.parent.name}/{folder.name}" if names.count(folder.name) > 1 else folder.name
            for folder in folders]


class _CacheOpener:
    """Opens the runs' cache only when a run has no up-to-date evaluation to read."""

    def __init__(self, cache_path: Path | None) -> None:
        self.cache_path, self.cache = cache_path, None

    def get(self, record: RunRecord, run_dir: Path) -> FeatureCache:
        if self.cache is None:
            path = self.cache_path or Path(record.cache["path"])
            if not path.is_file():
                raise FishsegError(f"{run_dir}: not evaluated yet, and its cache {path} is not there to score it; "
                                   f"pass --cache")
            self.cache = FeatureCache(path)
        return self.cache

    def close(self) -> None:
        if self.cache is not None:
            self.cache.file.close()


def _run_scores(run_dir: Path, opener: _CacheOpener, device: Any) -> RunScores:
    record = read_record(run_dir)
    if "best" not in record.checkpoints:
        raise FishsegError(f"{run_dir}: no epoch has finished yet; nothing to compare")
    curve = [row["val_iou"] for row in read_history(run_dir, record)["epochs"]]
    saved = _saved_scores(run_dir / REPORT_DIR, record)
    if saved is not None:
        image_ids, per_image, pooled = saved
        return RunScores(record, image_ids, per_image, pooled, curve)
    cache = opener.get(record, run_dir)
    evaluation = evaluate_run(cache, run_dir, device, full=False)
    return RunScores(record, evaluation.val_ids, {name: evaluation.scores[name] for name in SCORES},
                     evaluation.metrics["pooled_iou"], curve)


def _saved_scores(report_dir: Path, record: RunRecord) -> tuple[list[str], dict[str, np.ndarray], float] | None:
    """Per-image scores of an evaluation of the run's current best checkpoint on its own cache, or None."""
    if not (report_dir / METRICS_FILE).is_file() or not (report_dir / PER_IMAGE_FILE).is_file():
        return None
    metrics = read_json(report_dir / METRICS_FILE)
    if metrics.get("checkpoint_sha256") != record.checkpoints["best"].sha256:
        return None  # evaluated before the run went on
    if metrics.get("cache_fingerprint") != record.cache["fingerprint"]:
        return None  # scored on another cache's images: scored again, on the run's own cache or refused
    with (report_dir / PER_IMAGE_FILE).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    per_image = {name: np.array([float(row[name]) for row in rows]) for name in SCORES}
    return [row["image_id"] for row in rows], per_image, float(metrics["pooled_iou"])


def _load_entry(name: str, folder: Path, opener: _CacheOpener, device: Any) -> Entry:
    if holds_run(folder):
        return Entry(name, folder, [_run_scores(folder, opener, device)])
    folds = TrainConfig(**read_cv(folder)["train_config"]).folds
    runs = [fold_dir(folder, fold) for fold in range(folds)]
    missing = [str(run) for run in runs if not holds_run(run)]
    if missing:
        raise FishsegError(f"{folder}: cross-validation folds not trained yet ({', '.join(missing)}); "
                           f"resume it first")
    return Entry(name, folder, [_run_scores(run, opener, device) for run in runs])


def _first_run(folder: Path) -> Path:
    return folder if holds_run(folder) else fold_dir(folder, 0)


def _check_one_cache(folders: list[Path]) -> None:
    """Refuse entries of different caches from their records, before any of them is scored, saying how many of
    their shared validation images changed content between them where both recorded it."""
    runs = {folder: _first_run(folder) for folder in folders if holds_run(_first_run(folder))}
    caches = {folder: read_record(run).cache for folder, run in runs.items()}
    first, cache = next(iter(caches.items()), (None, None))
    for folder, other in caches.items():
        if other["fingerprint"] != cache["fingerprint"]:
            changes = _val_changes(runs[first], runs[folder])
            raise FishsegError(f"{first} and {folder} were trained on different caches ({cache['fingerprint']} at "
                               f"{cache['path']} vs {other['fingerprint']} at {other['path']})"
                               f"{'; ' + changes if changes else ''}; train them on one cache to compare them")


def _val_changes(run: Path, other: Path) -> str:
    """How the content of the validation images both runs share differs between them ("" where unrecorded)."""
    ours, theirs = split_digests(run, ("val",)), split_digests(other, ("val",))
    if ours is None or theirs is None:
        return ""
    shared = {image_id: digest for image_id, digest in ours.items() if image_id in theirs}
    return content_changes(shared, theirs, "their", "shared validation image")


def check_comparable(entries: list[Entry]) -> None:
    """The same validation images (per fold for cross-validations; one cache is checked before scoring);
    else exit 2 naming both."""
    first = entries[0]
    for entry in entries[1:]:
        if entry.is_cv != first.is_cv or len(entry.runs) != len(first.runs):
            raise FishsegError(f"{first.folder} and {entry.folder} validate on different images (a single split "
                               f"vs cross-validation, or other fold counts); compare like with like")
        for fold, (a, b) in enumerate(zip(first.runs, entry.runs), start=1):
            if sorted(a.image_ids) != sorted(b.image_ids):
                where = f"fold {fold} of " if first.is_cv else ""
                raise FishsegError(f"{first.folder} and {entry.folder} validate on different images ({where}split "
                                   f"{a.record.split['method']} vs {b.record.split['method']}, seeds "
                                   f"{a.record.train_config.seed} vs {b.record.train_config.seed}); compare runs "
                                   f"of one split")


def _differing(entries: list[Entry]) -> list[str]:
    configs = [dataclasses.asdict(entry.config) for entry in entries]
    return [field for field in configs[0] if len({repr(config[field]) for config in configs}) > 1]


def _leaderboard_entry(entry: Entry, fields: list[str], comparison: Any) -> LeaderboardEntry:
    config = dataclasses.asdict(entry.config)
    fold_ious = entry.fold_means("iou")
    curves = [run.val_iou_curve for run in entry.runs]
    length = min(len(curve) for curve in curves)
    records = [run.record for run in entry.runs]
    return LeaderboardEntry(
        name=entry.name, differing={field: value_text(config[field]) for field in fields},
        mean_iou=float(np.mean(fold_ious)), mean_iou_std=float(np.std(fold_ious)) if entry.is_cv else None,
        mean_dice=float(np.mean(entry.fold_means("dice"))),
        boundary_f=float(np.mean(entry.fold_means("boundary_f"))),
        pooled_iou=float(np.mean([run.pooled_iou for run in entry.runs])),
        folds=len(entry.runs) if entry.is_cv else 0, epochs=min(record.epochs_done for record in records),
        epochs_planned=records[0].epochs_planned, train_seconds=sum(record.train_seconds for record in records),
        val_iou_curve=np.mean([curve[:length] for curve in curves], axis=0).tolist(), comparison=comparison)


def run_compare(folders: Sequence[Path], out_dir: Path, *, baseline: Path | None = None,
                cache_path: Path | None = None, device: str = "auto") -> Leaderboard:
    """Gather, check and score the entries, compare each with the best (or ``baseline``), write the files."""
    if baseline is not None and not (holds_run(baseline) or holds_cv(baseline)):
        raise FishsegError(f"--baseline {baseline}: not a run or cross-validation folder")
    found = entry_folders([*folders, *([baseline] if baseline else [])])
    _check_one_cache(found)
    names = _entry_names(found)
    opener = _CacheOpener(cache_path)
    try:
        entries = [_load_entry(name, folder, opener, resolve_device(device)) for name, folder in zip(names, found)]
    finally:
        opener.close()
    check_comparable(entries)
    image_ids = sorted(entries[0].scores("iou"))
    ious = {entry.name: np.array([entry.scores("iou")[image_id] for image_id in image_ids]) for entry in entries}
    if baseline is not None:
        reference = names[found.index(baseline)]
    else:
        reference = max(entries, key=lambda entry: float(np.mean(entry.fold_means("iou")))).name
    comparisons = compare_to_reference(ious, reference) if len(entries) > 1 else {}
    fields = _differing(entries)
    board = [_leaderboard_entry(entry, fields, comparisons.get(entry.name)) for entry in entries]
    board.sort(key=lambda entry: -entry.mean_iou)
    write_leaderboard(make_output_dir(out_dir), board, reference=reference, notes=_notes(entries, image_ids))
    return Leaderboard(out_dir, board, reference)


def _notes(entries: list[Entry], image_ids: list[str]) -> list[str]:
    record = entries[0].runs[0].record
    notes = [f"{len(entries)} entries on cache {record.cache['path']} (fingerprint {record.cache['fingerprint']}), "
             f"{len(image_ids)} validation images paired"
             + (f" over {len(entries[0].runs)} folds" if entries[0].is_cv else "")]
    if record.backbone.get("random_init"):
        notes.append("The backbone is RANDOM-INIT: these numbers measure the pipeline, not DINOv3 features.")
    unfinished = [entry.name for entry in entries if any(run.record.status != "finished" for run in entry.runs)]
    if unfinished:
        notes.append(f"Unfinished (scored at their best epoch so far): {', '.join(unfinished)}.")
    return notes
