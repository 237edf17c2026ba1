"""``fishseg compare``: a leaderboard of runs that says which differences are real.

An entry is a run folder, or a cross-validation folder (one entry, its folds' validation images
pooled); a sweep folder counts as its entries, those it cannot score (failed, or not trained far enough)
listed without scores, as is a failed run named on its own (never the reference, and refused as
--baseline). Entries must share one cache and the same validation images (cross-validations: the same
folds), so that each image pairs the entries' scores. Per-image scores come from a run's evaluation when
it matches the run's best checkpoint, and are computed from the cache otherwise. Statistics: ``fishseg.evaluation.stats``; rendering: ``fishseg.evaluation.leaderboard``. A leaderboard is
written only where it replaces no leaderboard of other folders (``check_out``).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fishseg.config import TrainConfig, shown, value_text
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import METRICS_FILE, PER_IMAGE_FILE, evaluate_run
from fishseg.evaluation.leaderboard import (LeaderboardEntry, UnscoredEntry, compared_folders, holds_leaderboard,
                                            write_leaderboard)
from fishseg.evaluation.stats import compare_to_reference
from fishseg.formats.cache import FeatureCache, content_changes
from fishseg.formats.runs import REPORT_DIR, SWEEP_KIND, RunFolder, RunRecord
from fishseg.runtime import make_output_dir, plural, read_json, resolve_device

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
    class_ious: dict[str, float]  # several pixel classes: each class's IoU over the validation images; {} for binary


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

    def class_ious(self) -> dict[str, float]:
        """Each pixel class's IoU, the mean over folds where the class was scored ({} for binary runs)."""
        names = dict.fromkeys(name for run in self.runs for name in run.class_ious)
        return {name: float(np.mean([run.class_ious[name] for run in self.runs if name in run.class_ious]))
                for name in names}


@dataclasses.dataclass(frozen=True)
class Unscored:
    """An entry the leaderboard lists without scores (a failed run, or a sweep's config not trained far
    enough), and why."""

    folder: Path
    config: TrainConfig
    failed: bool  # its training failed (else: not trained far enough to score)
    reason: str
    name: str = ""  # as the leaderboard shows it, given once every entry is known

    @property
    def verdict(self) -> str:
        return f"{'failed' if self.failed else 'unfinished'}: {self.reason}"

    @property
    def described(self) -> str:
        """E.g. "lr=1e6 failed — loss is NaN …" (the reason may hold parentheses of its own)."""
        return f"{self.name} {'failed' if self.failed else 'is unfinished'} — {self.reason}"


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    """What ``fishseg.compare`` returns (and ``SweepResult.leaderboard``): runs side by side, written into
    ``out_dir`` (leaderboard.csv, .md, .html, .json and val_iou_curves.png).

    ``entries``: one per run or cross-validation, best mean IoU first, each with its paired comparison to the
    reference (left out of ``repr``); ``reference``: the name of the entry the others are compared with (the
    ``baseline``, else the best); ``unscored``: entries listed without scores (failed, or not trained far enough)
    and why. ``summary()`` says it in one line."""

    out_dir: Path
    entries: list[LeaderboardEntry] = dataclasses.field(repr=False)
    reference: str
    unscored: tuple[Unscored, ...] = dataclasses.field(default=(), repr=False)

    def summary(self) -> str:
        best = self.entries[0]
        verdicts = [entry.comparison.verdict for entry in self.entries if entry.comparison is not None]
        real = sum(verdict in ("better", "worse") for verdict in verdicts)
        tested = (f"{real} of {plural(len(verdicts), 'difference')} from {self.reference} "
                  f"{'is' if len(verdicts) == 1 else 'are'} real at 95%" if verdicts
                  else "nothing to compare it with")
        failed = sum(other.failed for other in self.unscored)
        counts = {"failed": failed, "unfinished": len(self.unscored) - failed}
        listed = " and ".join(f"{count} {state}" for state, count in counts.items() if count)
        unscored = f" (and {listed}, without scores)" if listed else ""
        score = "mean per-image mIoU" if best.class_ious else "mean IoU"
        return (f"leaderboard of {plural(len(self.entries), 'entry', 'entries')}{unscored}: best {best.name} "
                f"({score} {best.mean_iou:.4f}); {tested}; written to {self.out_dir}")


def default_out(folders: Sequence[Path], baseline: Path | None = None) -> Path:
    """The sweep folder when it is all that is compared (its own leaderboard), else ./compare."""
    return folders[0] if len(folders) == 1 and baseline is None and RunFolder(folders[0]).holds_sweep else DEFAULT_OUT


def check_out(out_dir: Path, compared: Sequence[Path], entries: Sequence[Path], *, default: bool = False) -> None:
    """Refuse an ``--out`` where the leaderboard would replace results of other folders: a run, a
    cross-validation or a sweep folder (but the one sweep compared alone, whose own leaderboard it is), or the
    leaderboard of entries not all among the ``entries`` now (one whose entries all are is brought up to date:
    nothing of it is lost). ``compared``: the folders as given; ``default``: ``out_dir`` was not typed."""
    kind = RunFolder(out_dir).kind
    if kind == SWEEP_KIND and [folder.resolve() for folder in compared] == [out_dir.resolve()]:
        return
    where, other = (f"{out_dir}, the default `out`,", "pass `out`") if default else \
        (f"`out={shown(str(out_dir))}`:", "pass another `out`")
    if kind is not None:
        raise FishsegError(f"{where} holds a {kind}, whose files a leaderboard of other folders would mix "
                           f"with or replace; {other}")
    recorded = compared_folders(out_dir)
    kept = recorded is not None and recorded <= {str(folder.resolve()) for folder in entries}
    if holds_leaderboard(out_dir) and not kept:
        listed = sorted(recorded or ())
        whose = f" ({', '.join(listed[:3])}{', …' if len(listed) > 3 else ''})" if listed else ""
        raise FishsegError(f"{where} holds the leaderboard of other folders{whose}; {other}, or remove {out_dir} "
                           f"first")


def _unscorable(folder: RunFolder) -> str | None:
    """Why a run or cross-validation ``folder`` cannot be scored yet, or None when it can."""
    if folder.holds_run:
        return None if "best" in folder.read_record().checkpoints else "no epoch finished yet"
    if not folder.holds_cv:
        return "not trained yet"
    runs = folder.runs()
    ready = sum(_unscorable(run) is None for run in runs)
    return None if ready == len(runs) else f"{ready} of {len(runs)} folds trained"


def failure(folder: Path) -> str | None:
    """Why the training of the run or cross-validation in ``folder`` failed, as its own records say or, for a
    config of a sweep, the sweep's; None when it did not fail."""
    return RunFolder(folder.parent).config_failures([folder.name]).get(folder.name)


def _sweep_configs(sweep_dir: Path) -> tuple[list[Path], list[Unscored]]:
    """The folders of a sweep's configs that can be scored, and the configs that cannot (failed or unfinished)."""
    found, unscored = [], []
    sweep = RunFolder(sweep_dir)
    configs = sweep.read_sweep().configs
    failures = sweep.config_failures([entry.name for entry in configs])
    for entry in configs:
        folder = sweep.config(entry.name)
        failed = failures.get(entry.name)
        reason = failed or _unscorable(folder)
        if reason is None:
            found.append(folder.path)
        else:
            unscored.append(Unscored(folder.path, entry.config, failed is not None, reason))
    return found, unscored


def _named_folder(folder: Path) -> tuple[list[Path], list[Unscored]]:
    """A run or cross-validation folder named on its own: scorable, or failed (listed without scores)."""
    failed = failure(folder)
    if failed is not None:
        return [], [Unscored(folder, RunFolder(folder).recorded_config(), True, failed)]
    reason = _unscorable(RunFolder(folder))
    if reason is not None:
        raise FishsegError(f"{folder}: {reason}; nothing to compare until it is further (resume it: "
                           f"fishseg train with `resume=True`), or leave it out")
    return [folder], []


def entry_folders(folders: Sequence[Path]) -> tuple[list[Path], list[Unscored]]:
    """Run and cross-validation folders, a sweep folder expanded into its configs' folders; and those that
    cannot be scored (failed runs, unfinished configs of a sweep). A run or cross-validation named on its own
    must be scorable or failed. A folder reached twice (a sweep's config also named on its own) is one entry."""
    found: list[Path] = []
    unscored: list[Unscored] = []
    for folder in folders:
        opened = RunFolder(folder)
        if opened.holds_sweep:
            scorable, others = _sweep_configs(folder)
        elif opened.holds_run or opened.holds_cv:
            scorable, others = _named_folder(folder)
        elif not folder.exists():
            raise FishsegError(f"{folder}: not found")
        else:
            raise FishsegError(f"{folder}: neither a run, a cross-validation nor a sweep folder "
                               f"(no run.json, cv.json or sweep.json)")
        seen = {path.resolve() for path in (*found, *(other.folder for other in unscored))}
        found += [path for path in scorable if path.resolve() not in seen]
        unscored += [other for other in others if other.folder.resolve() not in seen]
    if not found:
        listed = "; ".join(other.described for other in _named([], unscored)[1])
        raise FishsegError(f"{', '.join(map(str, folders))}: no runs to compare yet" + (f": {listed}" if listed else ""))
    return found, unscored


def _named(found: Sequence[Path], unscored: Sequence[Unscored]) -> tuple[list[str], list[Unscored]]:
    """The names the ``found`` entries are shown by, and the unscored ones with theirs: unique among all."""
    names = _entry_names([*found, *(other.folder for other in unscored)])
    return names[:len(found)], [dataclasses.replace(other, name=name)
                                for other, name in zip(unscored, names[len(found):])]


def _entry_names(folders: Sequence[Path]) -> list[str]:
    """Folder names, with as many of their parents' names as tell apart those that would clash."""
    depth = [1] * len(folders)
    while True:
        names = ["/".join(folder.resolve().parts[-count:]) for folder, count in zip(folders, depth)]
        clashing = [k for k, name in enumerate(names) if names.count(name) > 1]
        if not clashing:
            return names
        for k in clashing:
            depth[k] += 1


class _CacheOpener:
    """Opens the runs' cache only when a run has no up-to-date evaluation to read."""

    def __init__(self, cache_path: Path | None) -> None:
        self.cache_path, self.cache = cache_path, None

    def get(self, record: RunRecord, run_dir: Path) -> FeatureCache:
        if self.cache is None:
            path = self.cache_path or Path(record.cache["path"])
            if not path.is_file():
                raise FishsegError(f"{run_dir}: not evaluated yet, and its cache {path} is not there to score it; "
                                   f"pass `cache`")
            self.cache = FeatureCache(path)
        return self.cache

    def close(self) -> None:
        if self.cache is not None:
            self.cache.file.close()


def _run_scores(run: RunFolder, opener: _CacheOpener, device: Any) -> RunScores:
    record = run.read_record()
    if "best" not in record.checkpoints:
        raise FishsegError(f"{run}: no epoch has finished yet; nothing to compare")
    curve = [row["val_iou"] for row in run.read_history(record)["epochs"]]
    saved = _saved_scores(run.path / REPORT_DIR, record)
    if saved is not None:
        image_ids, per_image, metrics = saved
        return RunScores(record, image_ids, per_image, float(metrics["pooled_iou"]), curve, _class_ious(metrics))
    cache = opener.get(record, run.path)
    evaluation = evaluate_run(cache, run.path, device, full=False)
    return RunScores(record, evaluation.val_ids, {name: evaluation.scores[name] for name in SCORES},
                     evaluation.metrics["pooled_iou"], curve, _class_ious(evaluation.metrics))


def _class_ious(metrics: dict[str, Any]) -> dict[str, float]:
    """Per-class IoU over the validation images from an evaluation's metrics ({} for a binary run); a class
    neither in the truth nor predicted anywhere has none."""
    per_class = metrics.get("pixel_classes", {}).get("per_class", {})
    return {name: float(scores["iou"]) for name, scores in per_class.items() if scores.get("iou") is not None}


def _saved_scores(report_dir: Path,
                  record: RunRecord) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]] | None:
    """Per-image scores and metrics of an evaluation of the run's current best checkpoint on its own cache, or
    None."""
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
    return [row["image_id"] for row in rows], per_image, metrics


def _load_entry(name: str, folder: Path, opener: _CacheOpener, device: Any) -> Entry:
    runs = RunFolder(folder).runs()  # each fold scorable: see entry_folders
    return Entry(name, folder, [_run_scores(run, opener, device) for run in runs])


def _first_run(folder: Path) -> RunFolder:
    opened = RunFolder(folder)
    return opened if opened.holds_run else opened.fold(0)


def _check_one_cache(folders: list[Path]) -> None:
    """Refuse entries of different caches from their records, before any of them is scored, saying how many of
    their shared validation images changed content between them where both recorded it."""
    runs = {folder: _first_run(folder) for folder in folders if _first_run(folder).holds_run}
    caches = {folder: run.read_record().cache for folder, run in runs.items()}
    first, cache = next(iter(caches.items()), (None, None))
    for folder, other in caches.items():
        if other["fingerprint"] != cache["fingerprint"]:
            changes = _val_changes(runs[first], runs[folder])
            raise FishsegError(f"{first} and {folder} were trained on different caches ({cache['fingerprint']} at "
                               f"{cache['path']} vs {other['fingerprint']} at {other['path']})"
                               f"{'; ' + changes if changes else ''}; train them on one cache to compare them")


def _val_changes(run: RunFolder, other: RunFolder) -> str:
    """How the content of the validation images both runs share differs between them ("" where unrecorded)."""
    ours, theirs = run.split_digests(("val",)), other.split_digests(("val",))
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


def _differing(configs: Sequence[TrainConfig]) -> list[str]:
    values = [dataclasses.asdict(config) for config in configs]
    return [field for field in values[0] if len({repr(value[field]) for value in values}) > 1]


def _field_values(config: TrainConfig, fields: list[str]) -> dict[str, str]:
    values = dataclasses.asdict(config)
    return {field: value_text(values[field]) for field in fields}


def _leaderboard_entry(entry: Entry, fields: list[str], comparison: Any) -> LeaderboardEntry:
    fold_ious = entry.fold_means("iou")
    curves = [run.val_iou_curve for run in entry.runs]
    length = min(len(curve) for curve in curves)
    records = [run.record for run in entry.runs]
    return LeaderboardEntry(
        name=entry.name, differing=_field_values(entry.config, fields),
        mean_iou=float(np.mean(fold_ious)), mean_iou_std=float(np.std(fold_ious)) if entry.is_cv else None,
        mean_dice=float(np.mean(entry.fold_means("dice"))),
        boundary_f=float(np.mean(entry.fold_means("boundary_f"))),
        pooled_iou=float(np.mean([run.pooled_iou for run in entry.runs])),
        folds=len(entry.runs) if entry.is_cv else 0, epochs=min(record.epochs_done for record in records),
        epochs_planned=records[0].epochs_planned, train_seconds=sum(record.train_seconds for record in records),
        val_iou_curve=np.mean([curve[:length] for curve in curves], axis=0).tolist(), comparison=comparison,
        class_ious=entry.class_ious())


def _check_baseline(baseline: Path) -> None:
    """A --baseline is a run or cross-validation with scores: a failed one has none."""
    if not (RunFolder(baseline).holds_run or RunFolder(baseline).holds_cv):
        raise FishsegError(f"`baseline={shown(str(baseline))}`: not a run or cross-validation folder")
    failed = failure(baseline)
    if failed is not None:
        raise FishsegError(f"`baseline={shown(str(baseline))}`: its training failed, so it has no scores to compare "
                           f"with; pass another `baseline`, or none (the best entry is the reference). It failed: "
                           f"{failed}")


def run_compare(folders: Sequence[Path], out_dir: Path | None = None, *, baseline: Path | None = None,
                cache_path: Path | None = None, device: str = "auto") -> Leaderboard:
    """Gather, check and score the entries, compare each with the best (or ``baseline``), write the files
    into ``out_dir`` (default: ``default_out``)."""
    if baseline is not None:
        _check_baseline(baseline)
    compared = [*folders, *([baseline] if baseline else [])]
    found, unscored = entry_folders(compared)
    every = [*found, *(other.folder for other in unscored)]
    default, out_dir = out_dir is None, out_dir or default_out(folders, baseline)
    check_out(out_dir, compared, every, default=default)
    _check_one_cache(found)
    names, unscored = _named(found, unscored)
    opener = _CacheOpener(cache_path)
    try:
        entries = [_load_entry(name, folder, opener, resolve_device(device)) for name, folder in zip(names, found)]
    finally:
        opener.close()
    check_comparable(entries)
    image_ids = sorted(entries[0].scores("iou"))
    ious = {entry.name: np.array([entry.scores("iou")[image_id] for image_id in image_ids]) for entry in entries}
    if baseline is not None:
        reference = names[[folder.resolve() for folder in found].index(baseline.resolve())]
    else:
        reference = max(entries, key=lambda entry: float(np.mean(entry.fold_means("iou")))).name
    comparisons = compare_to_reference(ious, reference, groups=_folds_of(entries[0], image_ids)) \
        if len(entries) > 1 else {}
    fields = _differing([*(entry.config for entry in entries), *(other.config for other in unscored)])
    board = [_leaderboard_entry(entry, fields, comparisons.get(entry.name)) for entry in entries]
    board.sort(key=lambda entry: -entry.mean_iou)
    listed = [UnscoredEntry(other.name, _field_values(other.config, fields), other.verdict) for other in unscored]
    write_leaderboard(make_output_dir(out_dir), board, reference=reference, notes=_notes(entries, image_ids, unscored),
                      unscored=listed, compared=every)
    return Leaderboard(out_dir, board, reference, tuple(unscored))


def _folds_of(entry: Entry, image_ids: list[str]) -> np.ndarray | None:
    """The fold each image is validated in, for a cross-validation (whose means are means of fold means)."""
    if not entry.is_cv:
        return None
    fold = {image_id: k for k, run in enumerate(entry.runs) for image_id in run.image_ids}
    return np.array([fold[image_id] for image_id in image_ids])


def _notes(entries: list[Entry], image_ids: list[str], unscored: list[Unscored]) -> list[str]:
    record = entries[0].runs[0].record
    notes = [f"{plural(len(entries), 'entry', 'entries')} on cache {record.cache['path']} (fingerprint "
             f"{record.cache['fingerprint']}), {plural(len(image_ids), 'validation image')} paired"
             + (f" over {plural(len(entries[0].runs), 'fold')}" if entries[0].is_cv else "")]
    classes = entries[0].class_ious()
    if classes:
        notes.append(f"Several pixel classes ({', '.join(classes)}): an image's score is its mIoU (the mean IoU of "
                     f"the classes in its truth or prediction), paired image by image; pooled mIoU and IoU <class>: "
                     f"each class's IoU over all validation images (then averaged over classes).")
    if record.backbone.get("random_init"):
        notes.append("The backbone is RANDOM-INIT: these numbers measure the pipeline, not DINOv3 features.")
    unfinished = [entry.name for entry in entries if any(run.record.status != "finished" for run in entry.runs)]
    if unfinished:
        notes.append(f"Unfinished (scored at their best epoch so far): {', '.join(unfinished)}.")
    notes += [f"Without scores: {other.described}." for other in unscored]
    if any(other.failed for other in unscored):
        notes.append("A failed run is not resumed (it would fail the same way); a sweep skips its failed configs "
                     "unless it runs with `retry_failed=True`, which trains them again from the start.")
    return notes
