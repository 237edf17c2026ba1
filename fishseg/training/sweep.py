"""``fishseg sweep``: train the Cartesian product of config values over one cache, then compare them.

The cache is opened and loaded once; each config trains into ``OUT/<name>`` (a run folder, or a
cross-validation folder with ``--cv``) named by the fields that vary, e.g. ``decoder=linear,lr=0.0003``.
Running the same sweep again skips finished configs and resumes interrupted ones. A config whose training
fails (a non-finite loss, say) is recorded as failed in ``sweep.json`` (and its run in ``run.json``) and the sweep
goes on; a rerun skips it unless asked to retry, which trains it again from the start. Configs must validate on
the same images to be compared, so a grid that varies a field choosing them is refused before anything is written. Before training, the sweep says how many configs it will train and about how long that
takes, and asks before starting more than ``CONFIRM_ABOVE``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from fishseg.config import TrainConfig, format_layers, value_text
from fishseg.errors import FishsegError
from fishseg.evaluation.compare import Leaderboard, run_compare
from fishseg.evaluation.evaluate import evaluate_run, write_scores
from fishseg.evaluation.leaderboard import holds_leaderboard
from fishseg.formats.cache import FeatureCache
from fishseg.formats.runs import (FINISHED, REPORT_DIR, SWEEP_FILE, SWEEP_KIND, RunFolder, RunRecord, SweepEntry,
                                  SweepRecord, differing_fields)
from fishseg.models.decoders import build_decoder, uses_image
from fishseg.runtime import make_output_dir, plural, resolve_device
from fishseg.training.crossval import cross_validate, plan_cross_validation
from fishseg.training.train import (EpochCallback, Objective, TrainingData, check_cache, fused_option, plan_run,
                                    run_epoch, train_run)

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

logger = logging.getLogger(__name__)

Grid = dict[str, tuple[Any, ...]]
QUIET_DURING_SWEEP = ("fishseg.training.train", "fishseg.training.crossval")  # per-epoch tables would bury the progress lines
FOLDS_KEYS = ("cv", "folds")  # a grid file's name for --cv (one value: every config validates on the same folds)
CONFIRM_ABOVE = 50  # configs to train beyond which a sweep asks before it starts (or needs --yes)
TIMED_STEPS = 3  # training steps of one timed pass, per decoder, for the estimate (after an untimed pass)
VALIDATION_FIELDS = {  # TrainConfig fields that choose the validation images (train.split_indices) → how
    "seed": "the seed draws the validation images too",
    "split": "the split method chooses the validation images",
    "val_fraction": "the fraction chooses the validation images",
    "group_pattern": "the groups choose the validation images of a grouped split",
}
SEED_ADVICE = ("; to see how much results vary with the validation images, use `folds=K` (mean ± std over K folds, "
               "every image validated once)")


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What ``fishseg.sweep`` returns: the grid trained into the sweep folder, and its leaderboard.

    ``configs``: the grid's configs; ``trained``: those trained in this call, failed ones included (the others
    were finished or had failed before); ``wall_seconds``: this call's time, ``startup_seconds`` of it torch's
    one-time imports; ``epoch_seconds``: time inside epochs, summed over the jobs; ``leaderboard``: every config
    side by side (``Leaderboard``; left out of ``repr``); ``jobs``: configs trained at a time; ``failed``: config →
    why its training failed, in this call or before (left out of ``repr``); ``failed_now``: of the configs
    trained in this call, those that failed."""

    configs: int
    trained: int
    wall_seconds: float
    startup_seconds: float
    epoch_seconds: float
    leaderboard: Leaderboard = dataclasses.field(repr=False)
    jobs: int = 1
    failed: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    failed_now: int = 0

    @property
    def inside_epochs(self) -> float:
        """Share of the wall time after start-up that the job slots spent inside epochs (with one job, of the
        wall time itself): the rest is the sweep's own overhead (loading the cache, checkpoints, scoring, the
        leaderboard) and, with several jobs, slots left idle."""
        busy = (self.wall_seconds - self.startup_seconds) * self.jobs
        return self.epoch_seconds / busy if busy > 0 else 0.0

    def closing_line(self) -> str:
        slots = "" if self.jobs == 1 else f" (of {self.jobs} jobs' time)"
        share = (f" ({self.startup_seconds:.1f} s of it torch start-up), {self.inside_epochs:.0%} of the rest{slots} "
                 f"inside epochs" if self.trained else "")
        failed = (f"\n{plural(len(self.failed), 'config')} failed, listed without scores (a rerun skips them; "
                  f"`retry_failed=True` trains them again from the start):"
                  + "".join(f"\n  {name} — {why}" for name, why in self.failed.items()) if self.failed else "")
        now = f"{self.trained} trained now" + (f", {self.failed_now} of them failed" if self.failed_now else "")
        return (f"{plural(self.configs, 'config')} ({now}) in {self.wall_seconds:.1f} s{share}"
                f"{failed}\n{self.leaderboard.summary()}")


@dataclasses.dataclass(frozen=True)
class PassLimits:
    """When the estimate has timed enough passes: at least ``min_passes`` adding up to ``min_seconds``, but no
    more than ``max_passes`` or ``max_seconds`` in all."""

    min_passes: int = 5
    min_seconds: float = 0.5
    max_passes: int = 50
    max_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_passes <= self.max_passes or not 0 <= self.min_seconds <= self.max_seconds:
            raise ValueError(f"pass limits out of order: {self}")

    def enough(self, durations: Sequence[float]) -> bool:
        spent = sum(durations)
        return (len(durations) >= self.max_passes or spent >= self.max_seconds
                or (len(durations) >= self.min_passes and spent >= self.min_seconds))


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What a sweep is about to train, said before it starts."""

    configs: int
    to_train: int
    finished: int
    failed: int  # configs that failed in an earlier session and are skipped
    seconds: float | None  # estimated training time of the configs to train; None when there are none

    @property
    def needs_confirmation(self) -> bool:
        return self.to_train > CONFIRM_ABOVE

    def describe(self) -> str:
        skipped = f", {self.failed} failed before (`retry_failed=True` retries them)" if self.failed else ""
        estimate = ("" if self.seconds is None else
                    f"; about {_duration(self.seconds)} of training, one config at a time (from {TIMED_STEPS} timed "
                    f"training steps per decoder, the median of repeated passes; validation, scoring and "
                    f"checkpoints not counted)")
        return (f"{plural(self.configs, 'config')}: {self.to_train} to train, {self.finished} finished already"
                f"{skipped}{estimate}")


def _duration(seconds: float) -> str:
    """E.g. 40 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _train_images(config: TrainConfig, images: int) -> float:
    """Images in one epoch's training pass: (K−1)/K of the cache for a K-fold config, else 1 − val_fraction."""
    return images * ((config.folds - 1) / config.folds if config.folds else 1 - config.val_fraction)


def estimate_seconds(todo: Sequence[SweepEntry], images: int, seconds_per_image: Mapping[str, float]) -> float:
    """Training time of ``todo`` from the measured seconds per training image of each decoder: every epoch of
    every fold, one config at a time (an upper bound for configs that resume)."""
    return sum(entry.config.epochs * max(entry.config.folds, 1) * _train_images(entry.config, images)
               * seconds_per_image[entry.config.decoder] for entry in todo)


def seconds_per_image(data: TrainingData, config: TrainConfig, device: torch.device) -> float:
    """Seconds per training image of ``config``'s decoder, batch size and layers: the median of repeated passes
    of TIMED_STEPS training steps on the opened data (``timed_passes``), after one untimed pass that pays the
    first call's set-up for every batch shape (a partial last batch is a shape of its own). A few milliseconds
    timed once swung the estimate tenfold with the load of the machine. Learning rate 0, so no config can
    diverge here; the global random state is left as it was."""
    layers = check_cache(data.cache, config)
    count = min(len(data.cache), TIMED_STEPS * config.batch_size)
    split = data.split(np.arange(count), layers, guides=uses_image(config.decoder))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        decoder = build_decoder(config.decoder, len(layers) * data.cache.backbone.feature_dim,
                                data.cache.classes.channels).to(device)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=0.0, **fused_option(device))
        generator = torch.Generator().manual_seed(0)
        train_pass = functools.partial(run_epoch, decoder, split, config.batch_size, device, optimizer, generator,
                                       objective=Objective.of(data.cache, config, device))
        train_pass()
        return float(np.median(timed_passes(train_pass))) / count


def timed_passes(step: Callable[[], Any], limits: PassLimits = PassLimits()) -> list[float]:
    """Seconds of each call of ``step``: called until ``limits`` say there are enough passes that their median
    shrugs off a pause of a busy machine (a slow step stops sooner, at ``max_seconds``)."""
    durations: list[float] = []
    while not limits.enough(durations):
        started = time.perf_counter()
        step()
        durations.append(time.perf_counter() - started)
    return durations


def read_grid_file(path: Path, fields: Sequence[str]) -> Grid:
    """``field = value`` or ``field = [values]`` from a TOML file; names may use - or _. ``cv = K`` (or
    ``folds``) is read as ``folds``: one value, since configs of other folds would not compare."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FishsegError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise FishsegError(f"{path}: not valid TOML ({error})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        twice = _repeated([match.group(1) for match in re.finditer(r"^\s*([\w-]+)\s*=", text, re.M)])
        raise FishsegError(f"{path}: {_given_twice(twice)}" if twice else f"{path}: not valid TOML ({error})") from None
    twice = _repeated(list(table))
    if twice:
        raise FishsegError(f"{path}: {_given_twice(twice)}")
    grid = {_field(key): tuple(value) if isinstance(value, list) else (value,) for key, value in table.items()}
    unknown = sorted(set(grid) - {*fields, "folds"})
    if unknown:
        raise FishsegError(f"{path}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"known: {', '.join(fields)}, cv")
    empty = [field for field, values in grid.items() if not values]
    if empty:
        raise FishsegError(f"{path}: {', '.join(empty)} has no values")
    if len(grid.get("folds", ())) > 1:
        raise FishsegError(f"{path}: cv takes one value (every config validates on the same folds, so that they "
                           f"compare); run one sweep per K")
    for field, values in grid.items():
        for value in values:
            try:
                TrainConfig(**{field: value})
            except FishsegError as error:
                raise FishsegError(f"{path}: {error}") from None
    return grid


def _field(key: str) -> str:
    """The TrainConfig field a grid file's key names."""
    field = key.replace("-", "_")
    return "folds" if field in FOLDS_KEYS else field


def _repeated(keys: list[str]) -> list[str]:
    """The keys of the first field written more than once (batch-size and batch_size are one field)."""
    fields = [_field(key) for key in keys]
    twice = next((field for field in fields if fields.count(field) > 1), None)
    return [key for key, field in zip(keys, fields) if field == twice]


def _given_twice(keys: list[str]) -> str:
    spellings = sorted(set(keys))
    return (f"the field {_field(keys[0])} is given twice"
            + (f" (as {' and '.join(spellings)})" if len(spellings) > 1 else "") + "; keep one")


def _check_one_validation_set(grid: Grid, folds: int) -> None:
    """Configs are compared image by image, so they must validate on the same images: a grid that varies a field
    choosing them (or one that the folds make unused) is refused before anything is written."""
    for field, chooses in VALIDATION_FIELDS.items():
        values = grid.get(field, ())
        if len(values) < 2:
            continue
        listed = ", ".join(map(value_text, values[:3])) + (", …" if len(values) > 3 else "")
        unused = _unused_because(field, grid, folds)
        if unused:
            raise FishsegError(f"sweep value {field} lists {listed}: {unused}, so its configs would train alike; "
                               f"give {field} one value")
        raise FishsegError(f"sweep value {field} lists {listed}: {chooses}, so its configs would validate on "
                           f"different images and could not be compared (sweeps of different {field}s neither); "
                           f"give {field} one value{SEED_ADVICE if field == 'seed' else ''}")


def _unused_because(field: str, grid: Grid, folds: int) -> str | None:
    """Why a field that may choose the validation images is unused by every config of the grid, or None."""
    if field == "val_fraction" and folds:
        return "with `folds` the folds choose the validation images, not val_fraction"
    if field == "group_pattern" and "grouped" not in grid.get("split", (TrainConfig.split,)):
        return "a random split ignores the groups"
    return None


def expand_grid(grid: Grid, folds: int = 0) -> list[SweepEntry]:
    """Every combination of the grid's values as a validated TrainConfig, named by the fields that vary."""
    fields = list(grid)
    for field, values in grid.items():
        repeated = sorted({value_text(value) for value in values if values.count(value) > 1})
        if repeated:
            raise FishsegError(f"sweep value {field} lists {', '.join(repeated)} more than once; list each value once")
    _check_one_validation_set(grid, folds)
    varying = [field for field in fields if len(grid[field]) > 1]
    configs, names = [], set()
    for values in itertools.product(*(grid[field] for field in fields)):
        chosen = dict(zip(fields, values))
        try:
            config = TrainConfig(**chosen, folds=folds)
        except FishsegError as error:
            raise FishsegError(f"sweep value {error}") from None
        name = ",".join(f"{field}={value_text(chosen[field])}" for field in varying) or "run"
        name = re.sub(r"[^\w=,.+-]", "_", name)
        if name in names:
            raise FishsegError(f"two configs of the grid get the folder name {name}; make the values differ in more "
                               f"than the characters a folder name cannot hold")
        names.add(name)
        configs.append(SweepEntry(name, config))
    return configs


def _check_folder(out_dir: Path, entry: SweepEntry, cache: FeatureCache) -> bool:
    """Whether ``entry`` is finished already; refuses a folder that holds something else under its name."""
    folder = RunFolder(out_dir / entry.name)
    if entry.config.folds:
        plan_cross_validation(folder.path, entry.config, cache, **_continuation(folder))
        return folder.holds_cv and folder.read_cv().status == FINISHED
    if folder.holds_run:
        record = folder.read_record()
        differing = differing_fields(record.train_config, entry.config)
        if differing:
            raise FishsegError(f"{folder}: holds a run of other settings than this sweep's config of that name "
                               f"({'; '.join(differing)}); use another `out`")
    plan_run(folder.path, entry.config, cache, **_continuation(folder))
    return folder.holds_run and folder.read_record().status == FINISHED


def _continuation(folder: RunFolder) -> dict[str, bool]:
    """How a config trains into its folder: resuming the unfinished run or cross-validation there, or from the
    start where its training failed (a resume would fail the same way; the sweep retries only when asked)."""
    there = folder.holds_run or folder.holds_cv
    failed = there and folder.training_failure() is not None
    return {"resume": there and not failed, "overwrite": failed}


def _check_sweep_folder(out_dir: Path, cache: FeatureCache) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FishsegError(f"{out_dir}: exists and is not a folder")
    folder = RunFolder(out_dir)
    folder.require_kind(SWEEP_KIND)
    if folder.holds_sweep:
        cache.require(dict(folder.read_sweep().cache), out_dir / SWEEP_FILE, folder.sweep_digests())
    elif holds_leaderboard(out_dir):  # of a `compare`: the sweep's own would replace it
        raise FishsegError(f"{out_dir}: holds the leaderboard of a compare; use another `out`, or remove it first")


def _check_layer_sets(layer_sets: Sequence[Sequence[int]], cache: FeatureCache) -> None:
    """Layer sets that name the same cached blocks (-1 and 2 of a 2-block backbone; all and the one block
    cached) would train one config twice: refused like any value listed twice."""
    seen: dict[tuple[int, ...], str] = {}
    for layers in layer_sets:
        blocks = cache.select_layers(layers)
        if blocks in seen:
            raise FishsegError(f"sweep value layers lists {seen[blocks]} and {value_text(layers)}, the same blocks "
                               f"({format_layers(blocks)}) of {cache.path}; list each once")
        seen[blocks] = value_text(layers)


def _check_same_grid(out_dir: Path, configs: list[SweepEntry]) -> None:
    """A sweep folder holds one grid: another one would orphan its runs and replace its leaderboard."""
    folder = RunFolder(out_dir)
    if not folder.holds_sweep:
        return
    recorded = [config.name for config in folder.read_sweep().configs]
    names = [entry.name for entry in configs]
    if recorded != names:
        raise FishsegError(f"{out_dir}: holds a sweep of another grid ({plural(len(recorded), 'config')}: "
                           f"{', '.join(recorded[:3])}{', …' if len(recorded) > 3 else ''}); run that sweep again to "
                           f"continue it, or use another `out` (`fishseg compare` puts both sweeps side by side)")


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def run_sweep(cache_path: Path, out_dir: Path, grid: Grid, *, folds: int = 0, device: str = "auto",
              stream: bool | None = None, jobs: int = 1, retry_failed: bool = False,
              confirm: Callable[[SweepPlan], None] | None = None) -> SweepResult:
    """Train (or resume, or skip) every config of the grid, score each, and write the leaderboard into
    ``out_dir``. Everything that would be refused is checked before anything is trained, and ``confirm`` (by
    default a log line) sees the plan before anything is written: it may raise to stop. ``jobs`` configs train
    at a time on the one device, sharing the one copy of the cache. Configs that failed before are skipped
    unless ``retry_failed``."""
    if jobs < 1:
        raise FishsegError(f"`jobs={jobs}`: give 1 or more configs to train at a time")
    started = time.perf_counter()
    configs = expand_grid(grid, folds)
    torch_device = resolve_device(device)
    folder = RunFolder(out_dir)
    with FeatureCache(cache_path) as cache:
        _check_sweep_folder(out_dir, cache)
        _check_same_grid(out_dir, configs)
        _check_layer_sets(grid.get("layers", ()), cache)
        failed = {} if retry_failed else folder.config_failures([entry.name for entry in configs])
        finished = {entry.name for entry in configs if _check_folder(out_dir, entry, cache)}
        todo = [entry for entry in configs if entry.name not in finished and entry.name not in failed]
        epoch_seconds, startup_seconds, estimate, data = 0.0, 0.0, None, None
        if todo:
            startup_seconds = _torch_startup()
            data = TrainingData.open(cache, stream, guides=any(uses_image(entry.config.decoder) for entry in todo),
                                     device=torch_device)
            first = {entry.config.decoder: entry.config for entry in reversed(todo)}  # each decoder's first config
            estimate = estimate_seconds(todo, len(cache), {decoder: seconds_per_image(data, config, torch_device)
                                                           for decoder, config in first.items()})
        (confirm or _log_plan)(SweepPlan(len(configs), len(todo), len(finished - set(failed)), len(failed), estimate))
        make_output_dir(out_dir)
        recorded_cache = {**cache.summary(), "path": str(cache.path.resolve())}  # as run.json: found from anywhere
        folder.write_sweep(SweepRecord(recorded_cache, {field: list(values) for field, values in grid.items()},
                                       tuple(configs), folds, failed))
        if data is not None:
            with _quiet(QUIET_DURING_SWEEP):
                epoch_seconds = _train_all(data, out_dir, todo, torch_device, started, jobs)
    leaderboard = run_compare([out_dir], out_dir, cache_path=cache_path, device=device)
    all_failed = folder.read_sweep().failed
    return SweepResult(len(configs), len(todo), time.perf_counter() - started, startup_seconds, epoch_seconds,
                       leaderboard, jobs, all_failed, len(all_failed) - len(failed))


def _log_plan(plan: SweepPlan) -> None:
    logger.info(plan.describe())


def _torch_startup() -> float:
    """Seconds of the imports torch makes at the first optimizer (its compiler stack, about 1.5 s on the 2-core
    CPU): a cost of starting any training process, not of the sweep, so it is reported apart."""
    started = time.perf_counter()
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    return time.perf_counter() - started


def _train_all(data: TrainingData, out_dir: Path, todo: list[SweepEntry], device: torch.device, started: float,
               jobs: int) -> float:
    """Train the configs ``jobs`` at a time (threads: torch releases the GIL in its kernels, and on a GPU each
    job queues its kernels on a stream of its own); returns their seconds inside epochs. Ctrl-C stops every
    job at the end of its epoch, each run left resumable."""
    train = functools.partial(_train_entry, data, out_dir, device=device, total=len(todo), started=started)
    if jobs == 1:
        return sum(train(entry, position) for position, entry in enumerate(todo, start=1))
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        # each job runs in a copy of this context, so that the --precision scope reaches its thread
        running = [pool.submit(contextvars.copy_context().run, train, entry, position, stop=stop)
                   for position, entry in enumerate(todo, start=1)]
        try:
            return sum(future.result() for future in running)
        except BaseException:
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise


_SWEEP_RECORD = threading.Lock()  # concurrent jobs add their failures to sweep.json one at a time


def _job_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """A CUDA stream of the job's own, so that concurrent jobs' kernels can overlap; nothing on the CPU."""
    return torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()


def _train_entry(data: TrainingData, out_dir: Path, entry: SweepEntry, position: int, *, device: torch.device,
                 total: int, started: float, stop: threading.Event | None = None) -> float:
    """Train one config (resuming what is there) and score it; returns its seconds inside epochs. A set
    ``stop`` interrupts it after its current epoch."""
    folder, config = out_dir / entry.name, entry.config
    epochs = config.epochs * max(config.folds, 1)
    seconds = 0.0
    with tqdm(total=epochs, unit="epoch", desc=entry.name, leave=False, dynamic_ncols=True) as bar:
        def on_epoch(record: RunRecord, row: dict[str, float]) -> None:
            nonlocal seconds
            seconds += row["seconds"]
            bar.update(1)
            bar.set_postfix(val_iou=f"{row['val_iou']:.3f}")
            if stop is not None and stop.is_set() and record.status != FINISHED:
                raise KeyboardInterrupt

        try:
            with _job_stream(device):
                score = _train_and_score(data, folder, config, device, on_epoch)
        except FishsegError as error:  # this config's own failure (Ctrl-C is no FishsegError: it stops the sweep)
            with _SWEEP_RECORD:
                RunFolder(out_dir).record_failed_config(entry.name, str(error))
            score = f"FAILED, {error}"
    elapsed = time.perf_counter() - started
    left = elapsed / position * (total - position)
    tqdm.write(f"[{position}/{total}] {entry.name}: {score} ({elapsed:.0f} s so far, about {left:.0f} s left)")
    return seconds


def _train_and_score(data: TrainingData, folder: Path, config: TrainConfig, device: torch.device,
                     on_epoch: EpochCallback) -> str:
    """Train one config into ``folder`` (resuming what is there), score it, and say its score."""
    if config.folds:
        cv = cross_validate(data, folder, config, device=device, on_epoch=on_epoch, **_continuation(RunFolder(folder)))
        return f"mean IoU {cv.summary['mean_iou']['mean']:.4f} ± {cv.summary['mean_iou']['std']:.4f}"
    train_run(data, folder, config, device=device, on_epoch=on_epoch, **_continuation(RunFolder(folder)))
    evaluation = evaluate_run(data.cache, folder, device, full=False, source=data.scoring_source())
    write_scores(folder / REPORT_DIR, evaluation)
    return f"mean IoU {evaluation.metrics['mean_iou']:.4f}"
