"""Command line: ``fishseg extract|train|evaluate|demo`` and the three top-level scripts.

Each command parses its options, calls one ``fishseg.api`` function and prints from its result. A
``FishsegError`` becomes a one-line ``Error: ...`` and exit status 2; anything else is a bug and keeps its
traceback. The API imports the stage modules inside its functions, so that ``--help`` answers without loading
transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from fishseg import api
from fishseg.config import (AUGMENTATIONS, CLASS_WEIGHTS, COMPRESSIONS, DECODER_NAMES, DEFAULT_BACKBONE,
                            DEFAULT_COMPRESSION, DEMO_MIN_IMAGES, DEMO_SPECIES, LOSSES, PRECISIONS, SCHEDULES, SPLITS,
                            VIEWS, ExtractConfig, TrainConfig, format_layers, shown)
from fishseg.distributed import is_main_process, under_torchrun
from fishseg.errors import FishsegError, Flag, render_flags
from fishseg.version import __version__

DEVICES = click.Choice(["auto", "cpu", "cuda"])
TRAIN_DEFAULTS = TrainConfig()
EXTRACT_DEFAULTS = ExtractConfig()


INTERRUPTED, TERMINATED = 130, 143  # the shell's statuses for a command stopped by Ctrl-C (SIGINT), by SIGTERM
DISTRIBUTED_COMMANDS = {"extract", "train"}  # the others would run whole on every torchrun process
RESUME_ADVICE = {  # what Ctrl-C tells, per command: only what is true of that command
    "extract": "Finished batches are kept: run the same command again to resume.",
    "train": "Finished epochs are kept: run the same command with --resume to continue.",
    "sweep": "Finished configs and epochs are kept: run the same command again to continue.",
}
NOTHING_KEPT_ADVICE = {  # what it tells instead when its --out folder keeps no run: no epoch had finished
    "train": "No epoch had finished: nothing was kept; run the same command (without --resume) to start again.",
    "sweep": "No epoch had finished: nothing was kept; run the same command again to start the sweep.",
}


class UserError(click.ClickException):
    exit_code = 2


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets both through), and names a refused
    value as typed (click's says "-1.0" for -1)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"'{value}' is not a finite number.", param, ctx)
        try:
            return super().convert(number, param, ctx)
        except click.BadParameter:
            self.fail(f"'{value}' is not in the range {self._describe_range()}.", param, ctx)


def list_items(text: str, separator: str, expected: str, param: click.Parameter | None,
               ctx: click.Context | None) -> list[str]:
    """The items of a list typed on the command line. Every list reads alike: an empty item (an empty value, or a
    leading, trailing or doubled separator) is refused, never skipped; leave an option out for its default."""
    items = [item.strip() for item in text.split(separator)]
    if not all(items):
        raise click.BadParameter(f"'{text}': an empty value in the list; expected {expected}", ctx, param)
    return items


class Blocks(click.ParamType):
    """Backbone block indices separated by commas: ``12``, ``6,9,12``, ``-1,-4`` (from the end); "all" = ()."""

    name = "BLOCKS"
    EXPECTED = "block indices separated by commas, e.g. 12 or 6,9,12 or -1,-4, or all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        if value.strip() == "all":
            return ()
        try:
            return tuple(int(part) for part in list_items(value, ",", self.EXPECTED, param, ctx))
        except ValueError:
            self.fail(f"'{value}': expected {self.EXPECTED}", param, ctx)


class Views(click.ParamType):
    """Names from config.VIEWS separated by commas (none: leave the option out)."""

    name = "VIEWS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        views = tuple(list_items(value, ",", "views separated by commas, e.g. hflip,rot90 (none: leave "
                                            "--views out)", param, ctx))
        unknown = [view for view in views if view not in VIEWS]
        if unknown:
            self.fail(f"unknown view '{unknown[0]}'; choose from {', '.join(VIEWS)}", param, ctx)
        return views


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping its workers), raised where the process is,
    so that it stops exactly as Ctrl-C does: every ``except KeyboardInterrupt`` records and cleans up alike."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs in the main thread, SIGTERM raises ``Terminated``; the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# click parameter names that are not the API's keyword for the same thing (every other name is: `compiled` is
# --compile's, `folds` --cv's, `grid_file` --grid's, `stream` --stream/--in-memory's)
API_KEYWORDS = {"cache_path": "cache", "run_dir": "run", "json_path": "json"}


@functools.cache
def option_flags() -> dict[str, Flag]:
    """Each API keyword's flag, read from the commands' own options: the first long name, and the second name of
    an on/off switch. A keyword means one thing in every command, so it has one flag."""
    flags: dict[str, Flag] = {}
    for cli_command in main.commands.values():
        for param in cli_command.params:
            if isinstance(param, click.Option):
                longs = [name for name in param.opts if name.startswith("--")]
                flag = Flag(longs[0], param.secondary_opts[0] if param.secondary_opts else None)
                keyword = API_KEYWORDS.get(param.name, param.name)
                if flags.setdefault(keyword, flag) != flag:
                    raise AssertionError(f"{keyword}: {flags[keyword]} in one command, {flag} in another")
    return flags


def as_typed(message: str) -> str:
    """A library message for the command line: its API keywords (`lr`, `overwrite=True`) as flags."""
    return render_flags(message, option_flags())


class _FlagsInLogs(logging.Filter):
    """Renders the library's log messages for the command line, as ``as_typed`` does its errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = as_typed(record.getMessage()), None
        return True


@contextlib.contextmanager
def _flags_in_logs() -> Iterator[None]:
    """While a command runs, the log handlers render keywords as flags; afterwards (the library called from
    Python in the same process) they no longer do."""
    rendering, handlers = _FlagsInLogs(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(rendering)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(rendering)


def command(function: Callable[..., Any]) -> Callable[..., Any]:
    """Configure logging once, turn user errors into one-line messages (options named as flags), and stop on
    Ctrl-C or SIGTERM with advice on what was kept (exit 130 or 143, as a shell reports a process ended by
    those signals)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            if under_torchrun() and function.__name__ not in DISTRIBUTED_COMMANDS:
                raise FishsegError(f"`{function.__name__}` runs in one process; start it without torchrun "
                                   f"(only {' and '.join(sorted(DISTRIBUTED_COMMANDS))} use several)")
            with _sigterm_as_interrupt(), _flags_in_logs():
                return function(*args, **kwargs)
        except FishsegError as error:
            raise UserError(as_typed(str(error))) from None
        except KeyboardInterrupt as stop:
            if is_main_process():
                click.echo(f"\nInterrupted. {_stop_advice(function.__name__, kwargs.get('out'))}", err=True)
            sys.exit(TERMINATED if isinstance(stop, Terminated) else INTERRUPTED)

    return wrapper


def _stop_advice(command_name: str, out: Path | None) -> str:
    """What a stopped command kept and how to go on; train and sweep look at what their --out folder keeps."""
    if command_name in NOTHING_KEPT_ADVICE:
        from fishseg.formats.runs import RunFolder

        if not RunFolder(out).keeps_a_run:
            return NOTHING_KEPT_ADVICE[command_name]
    return RESUME_ADVICE.get(command_name, "Nothing it was writing is left half-written.")


def device_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """--device, and --precision, under which the command runs."""
    function = click.option(
        "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
        help="auto: fp32 on the CPU; bf16 on GPUs of compute capability 8.0+; below, an fp16 backbone and an "
             "fp32 decoder. fp16 also trains the decoder in fp16 (with loss scaling).")(function)
    return click.option("--device", type=DEVICES, default="auto", show_default=True,
                        help="auto uses CUDA when present and this torch build supports the GPU, else the CPU.")(
        function)


def deterministic_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """--deterministic: the command runs with deterministic algorithms only."""
    return click.option("--deterministic", is_flag=True,
                        help="Deterministic algorithms only, so that training repeats bit for bit on one machine "
                             "(slower on GPUs; recorded in run.json).")(function)


def workers_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--num-workers", default=None, type=click.IntRange(0),
                        help="Image decoding workers [default: half the cores on the CPU, all but one on CUDA].")(function)


# Existence is checked by the stages, whose one-line messages name the file (click's span several lines).
input_file = click.Path(dir_okay=False, path_type=Path)
input_dir = click.Path(file_okay=False, path_type=Path)


@click.command("extract")
@click.option("--data-root", required=True, type=input_dir,
              help="Kaggle fish download (or its Fish_Dataset/), or a folder with images/ and masks/.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Cache file to write (.h5).")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True, help="Hub id or local model folder.")
@click.option("--image-size", default=EXTRACT_DEFAULTS.image_size, show_default=True, type=click.IntRange(16),
              help="Square input side; a multiple of the patch size (16).")
@click.option("--preview-size", default=EXTRACT_DEFAULTS.preview_size, show_default=True, type=click.IntRange(16),
              help="Side of the RGB preview stored per image for reports.")
@click.option("--layers", default=format_layers(EXTRACT_DEFAULTS.layers), show_default=True, type=Blocks(),
              help="Blocks whose patch tokens (after the final norm) are stored: 12, 6,9,12 or -1,-4 from the end.")
@click.option("--views", default=(), type=Views(),
              help=f"Also store the features of these transformed photos (any of {','.join(VIEWS)}), for "
                   f"`train --augment views`.")
@click.option("--classes", default=None, metavar="FILE|species",
              help="Several pixel classes (README: Several classes). FILE: a JSON list, entry k naming class k (0 = "
                   "background): names for masks whose pixel values are class indices (8-bit grayscale or palette "
                   "PNG), or {\"name\": ..., \"rgb\": [r, g, b]} entries for colour-coded RGB masks. species: binary "
                   "masks whose fish take their image's species (class) folder as class (Kaggle layout, or "
                   "images/<class>/). Without it: binary masks, non-zero = fish.")
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Images per backbone forward [default: 8 on the CPU, 64 on CUDA].")
@workers_option
@click.option("--compression", default=DEFAULT_COMPRESSION, show_default=True, type=click.Choice(COMPRESSIONS),
              help="HDF5 compression of the features (see `fishseg bench` for the trade-off).")
@click.option("--overwrite", is_flag=True, help="Replace a finished cache (kept, or refused when stale, without it).")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out with a warning (recorded in the cache).")
@device_option
@command
def extract(data_root: Path, out: Path, backbone: str, image_size: int, preview_size: int, layers: tuple[int, ...],
            views: tuple[str, ...], classes: str | None, batch_size: int | None, num_workers: int | None,
            compression: str, overwrite: bool, skip_bad: bool, device: str, precision: str) -> None:
    """Run the frozen backbone once over every image and write patch features, masks and previews to one HDF5 cache.

    Resumable: stopped at any point, the same command continues where it stopped. Under
    `torchrun --nproc-per-node N` each process extracts a contiguous share of the images.
    """
    result = api.extract(data_root, out, backbone=backbone, image_size=image_size, preview_size=preview_size,
                         layers=layers, views=views, batch_size=batch_size, num_workers=num_workers,
                         compression=compression, overwrite=overwrite, skip_bad=skip_bad, device=device,
                         precision=precision, classes=classes)
    if is_main_process():
        click.echo(f"cache ready: {result.cache}")
        if not result.classes.binary and result.class_shares:
            click.echo("pixel classes: " + ", ".join(f"{name} {share:.1%}" for name, share in
                                                     result.class_shares.items()))


@dataclasses.dataclass(frozen=True)
class TrainOption:
    """One TrainConfig field as a command-line option: single-valued for `train`, a comma list for `sweep`."""

    field: str
    type: click.ParamType
    help: str = ""
    listable: bool = True  # False: `sweep` takes the value verbatim (a regex may hold commas)
    shown_default: str | None = None  # what --help says the default is, when not the value itself
    separator: str = ","  # between `sweep`'s values (a value that is itself a comma list needs another)

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


TRAIN_OPTIONS = (
    TrainOption("decoder", click.Choice(DECODER_NAMES), "Decoder from the registry (README: Decoders)."),
    TrainOption("epochs", click.IntRange(1)),
    TrainOption("batch_size", click.IntRange(1)),
    TrainOption("lr", FiniteFloat(min=0, min_open=True), "AdamW learning rate."),
    TrainOption("weight_decay", FiniteFloat(min=0), "AdamW weight decay."),
    TrainOption("val_fraction", FiniteFloat(0, 1, min_open=True, max_open=True),
                "Share of images for validation (one split; --cv uses folds)."),
    TrainOption("seed", click.IntRange(0), "Drives split, init and batch order."),
    TrainOption("split", click.Choice(SPLITS),
                "random reproduces the reference; grouped keeps near-duplicates on one side (see README)."),
    TrainOption("group_pattern", click.STRING, "Regex whose match in an image id names its group.", listable=False,
                shown_default="the cache's near-duplicate groups"),
    TrainOption("loss", click.Choice(LOSSES), "Binary masks: bce, dice (soft Dice) or bce+dice; a cache with classes: "
                                              "ce (cross-entropy), dice (multi-class soft Dice) or ce+dice.",
                shown_default="bce; ce for a cache with classes"),
    TrainOption("schedule", click.Choice(SCHEDULES), "cosine: linear warm-up over --warmup-epochs, then cosine "
                                                     "decay to 0."),
    TrainOption("warmup_epochs", click.IntRange(0)),
    TrainOption("augment", click.Choice(AUGMENTATIONS),
                "flips: random flips and 90° rotations of the cached grid, mask (and guided's preview), per batch; "
                "views: each image in one of the views the cache stores (extract --views), drawn per epoch."),
    TrainOption("class_weights", click.Choice(CLASS_WEIGHTS),
                "With classes: balanced weighs each class's pixels by its inverse frequency in the cache."),
    TrainOption("layers", Blocks(), "Cached blocks the decoder sees, concatenated on channels: 12, 6,9,12, -1 or all "
                                    "(every cached block).", separator="/", shown_default="all cached blocks"),
)


def train_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Every TrainConfig field as one option, its default taken from TrainConfig."""
    for option in reversed(TRAIN_OPTIONS):
        function = click.option(option.flag, option.field, type=option.type,
                                show_default=option.shown_default or True,
                                default=getattr(TRAIN_DEFAULTS, option.field), help=option.help)(function)
    return function


def _value_list(option: TrainOption) -> Callable[[click.Context, click.Parameter, str | None], tuple | None]:
    def parse(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple | None:
        if text is None:
            return None
        parts = list_items(text, option.separator, f"values separated by '{option.separator}'", param,
                           ctx) if option.listable else [text]
        return tuple(option.type.convert(part, param, ctx) for part in parts)
    return parse


def sweep_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Every TrainConfig field as a comma list of values to sweep (unset: the --grid file's, else the default)."""
    for option in reversed(TRAIN_OPTIONS):
        default = option.shown_default or shown(getattr(TRAIN_DEFAULTS, option.field))
        kind = ("a value (taken verbatim)" if not option.listable else
                f"values separated by {'commas' if option.separator == ',' else repr(option.separator)}")
        function = click.option(option.flag, option.field, default=None, callback=_value_list(option),
                                metavar="LIST" if option.listable else "TEXT",
                                help=f"{option.help} As {kind}; default {default}.".strip())(function)
    return function


def _folds(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 0 or value == 1:
        raise click.BadParameter("K-fold cross-validation needs K >= 2 (0: one train/val split)", ctx, param)
    return value


def cv_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--cv", "folds", default=0, type=int, callback=_folds, metavar="K",
                        help=f"{help_text} K >= 2; 0: one train/val split.")


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """The options among ``fields`` that the user typed (not left at their defaults)."""
    context = click.get_current_context()
    return {name: value for name, value in fields.items()
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}


def stream_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--stream/--in-memory", default=None,
                        help="Read batches from the cache file, or hold features in memory [default: in memory when "
                             "they take under half the free memory].")(function)


@click.command("train")
@click.option("--cache", "cache_path", required=True, type=input_file, help="Cache from `extract`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder to write.")
@train_options
@cv_option("K-fold cross-validation: K runs in OUT/fold-k and OUT/cv.json with mean ± std.")
@click.option("--resume", is_flag=True, help="Continue the unfinished run in OUT from its last finished epoch, with "
                                             "its own settings (options given must agree with them).")
@click.option("--overwrite", is_flag=True, help="Replace the run in OUT (refused without it or --resume).")
@click.option("--compile", "compiled", is_flag=True,
              help="Run the decoder through torch.compile (pays a compile first; recorded in run.json).")
@stream_option
@device_option
@deterministic_option
@command
def train(cache_path: Path, out: Path, folds: int, resume: bool, overwrite: bool, compiled: bool, stream: bool | None,
          device: str, precision: str, deterministic: bool, **fields: Any) -> None:
    """Train a decoder from the cached features only (no images, no backbone).

    A folder that already holds a run is never overwritten silently: add --resume to continue it
    (weights, optimizer, schedule, random state and history are restored, so it ends as an
    uninterrupted run would) or --overwrite to replace it. Under `torchrun --nproc-per-node N` each
    process computes a share of every batch (DDP); the run equals a one-process run up to
    floating-point order.
    """
    from fishseg.runtime import plural

    fields["folds"] = folds
    result = api.train(cache_path, out, resume=resume, overwrite=overwrite, compiled=compiled, stream=stream,
                       device=device, precision=precision, deterministic=deterministic, **_given(fields))
    if not is_main_process():
        return
    if isinstance(result, api.CrossValidationResult):
        click.echo(f"{result.folds}-fold {result.split} cross-validation: " + ", ".join(
            f"{name} {mean:.4f} ± {std:.4f}" for name, (mean, std) in result.summary.items()))
        click.echo(f"written: {result.out}/cv.json")
        return
    duplicates = plural(result.val_with_duplicate_in_train, "val image")
    best = f"best val {result.record.score_name} {result.best_val_iou:.4f}"
    click.echo(f"run {result.status}: {result.out} ({best} at epoch "
               f"{result.best_epoch} of {result.epochs_planned}; {duplicates} with a near-duplicate in train)")


@click.command("sweep")
@click.option("--cache", "cache_path", required=True, type=input_file, help="Cache from `extract`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Sweep folder: one run folder per config, sweep.json and the leaderboard.")
@click.option("--grid", "grid_file", default=None, type=input_file,
              help="TOML file of field = value or [values] (fields as the options below, - or _, and cv = K for "
                   "--cv); options given on the command line replace the file's.")
@sweep_options
@cv_option("Each config is a K-fold cross-validation instead of one split.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
              help="Configs trained at a time on the one device, sharing one copy of the cache (on a GPU, more "
                   "than 1 keeps it busy; results are those of one at a time).")
@click.option("--retry-failed", is_flag=True,
              help="Train again, from the start, the configs that failed in an earlier run of this sweep "
                   "(skipped without it).")
@click.option("--yes", is_flag=True, help="Start a sweep of more than 50 configs to train without asking.")
@stream_option
@device_option
@deterministic_option
@command
def sweep(cache_path: Path, out: Path, grid_file: Path | None, folds: int, jobs: int, retry_failed: bool, yes: bool,
          stream: bool | None, device: str, precision: str, deterministic: bool, **lists: tuple | None) -> None:
    """Train every combination of the given values (the Cartesian product) over one cache, then compare them.

    Example: `fishseg sweep --cache C --out S --decoder seed-cnn,linear --lr 1e-3,3e-4 --epochs 20`
    trains 4 configs into S/decoder=linear,lr=0.0003/ and so on, named by the fields that vary.
    The cache is loaded once for all configs. Run the same command again to continue: finished
    configs are skipped, interrupted ones resume. A config whose training fails (e.g. a
    diverging --lr) is recorded as failed and the others go on; it is not retried without
    --retry-failed (which trains it again from the start). Configs are compared on the same
    validation images, so --seed, --split, --val-fraction and --group-pattern take one value
    (for the spread over validation sets, use --cv). Before training, the sweep says how many configs it trains and about how
    long that takes; above 50 it asks first (or needs --yes). The leaderboard (see `fishseg
    compare`) is written into OUT at the end.
    """
    try:
        result = api.sweep(cache_path, out, grid_file=grid_file, folds=folds if _given({"folds": folds}) else None,
                           jobs=jobs, retry_failed=retry_failed, yes=yes,
                           confirm=functools.partial(_confirm_plan, yes=yes), stream=stream, device=device,
                           precision=precision, deterministic=deterministic,
                           **{field: values for field, values in lists.items() if values is not None})
    except api.SweepDeclined:
        click.echo("Sweep not started: nothing was written.")
        raise click.exceptions.Exit(NOT_STARTED) from None
    click.echo(as_typed(result.closing_line()))


def _interactive() -> bool:
    """Whether someone at a terminal can answer a question."""
    return sys.stdin.isatty()


NOT_STARTED = 1  # exit status of a sweep the user declined at the prompt (click's, for an aborted command)


def _confirm_plan(plan: Any, *, yes: bool) -> bool:
    """Say what the sweep is about to train; above the threshold, ask (or, with no terminal, require --yes)."""
    from fishseg.training.sweep import CONFIRM_ABOVE

    click.echo(as_typed(plan.describe()))
    if not plan.needs_confirmation or yes:
        return True
    if not _interactive():
        raise FishsegError(f"{plan.to_train} configs to train, more than {CONFIRM_ABOVE}: add --yes to start them "
                           f"(there is no terminal to ask)")
    return _confirmed(f"Train {plan.to_train} configs?")


def _confirmed(question: str) -> bool:
    """The answer at the terminal; end of input or Ctrl-C at the prompt is a no."""
    try:
        return click.confirm(question)
    except click.Abort:
        click.echo()
        return False


@click.command("compare")
@click.argument("folders", nargs=-1, required=True, type=input_dir)
@click.option("--baseline", default=None, type=input_dir,
              help="Run (or cross-validation) folder every entry is compared with [default: the best].")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Leaderboard folder [default: the sweep folder when it is the only folder given, else ./compare]; "
                   "refused where it would replace a leaderboard whose entries are not all compared now.")
@click.option("--cache", "cache_path", default=None, type=input_file,
              help="The runs' cache, to score runs not evaluated yet [default: the path the runs recorded].")
@device_option
@command
def compare(folders: tuple[Path, ...], baseline: Path | None, out: Path | None, cache_path: Path | None,
            device: str, precision: str) -> None:
    """Put runs side by side (a sweep folder counts as its runs, a --cv folder as one entry) and say which
    differences are real.

    Every entry is paired with the best (or --baseline) image by image: mean IoU difference with a 95%
    bootstrap confidence interval, Wilcoxon signed-rank p (Holm-adjusted over the entries) and a
    verdict. Runs must share one cache and the same validation images (cross-validations: the same
    folds). Writes leaderboard.csv, .md, .html and val_iou_curves.png.
    """
    board = api.compare(folders, baseline=baseline, out=out, cache=cache_path, device=device, precision=precision)
    click.echo(board.summary())


@click.command("evaluate")
@click.option("--cache", "cache_path", required=True, type=input_file, help="The cache the run was trained on.")
@click.option("--run", "run_dir", required=True, type=input_dir, help="Run folder from `train`.")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder [default: RUN/report]; never a run, cross-validation or sweep folder, nor another "
                   "run's report folder.")
@device_option
@command
def evaluate(cache_path: Path, run_dir: Path, out: Path | None, device: str, precision: str) -> None:
    """Score the run's best checkpoint on its validation split and write metrics and a report."""
    result = api.evaluate(cache_path, run_dir, out=out, device=device, precision=precision)
    click.echo(_summary(result.metrics, result.out))


def _summary(metrics: dict[str, Any], out: Path) -> str:
    from fishseg.runtime import plural

    pixel = metrics.get("pixel_classes")
    scores = (f"mean IoU {metrics['mean_iou']:.4f}, reference batch IoU {metrics['reference_batch_iou']:.4f}"
              if pixel is None else f"mIoU {pixel['miou']:.4f} (per-image mean {pixel['miou_per_image']:.4f}), "
                                    f"pixel accuracy {pixel['pixel_accuracy']:.4f}")
    lines = [f"{plural(metrics['n_images'], 'validation image')}: {scores}, mean Dice {metrics['mean_dice']:.4f} "
             f"(backbone {metrics['backbone']}); {metrics['val_with_duplicate_in_train']} with a near-duplicate "
             f"in training"]
    if metrics["random_init"]:
        lines.append("NOTE: the backbone is RANDOM-INIT; these numbers say nothing about DINOv3 features.")
    lines.append(f"report: {out}")
    return "\n".join(lines)


@click.command("probe")
@click.option("--cache", "cache_path", required=True, type=input_file, help="Cache from `extract`.")
@click.option("--split", default=TRAIN_DEFAULTS.split, show_default=True, type=click.Choice(SPLITS))
@click.option("--group-pattern", default="", help="Regex whose match in an image id names its group.")
@click.option("--val-fraction", default=TRAIN_DEFAULTS.val_fraction, show_default=True,
              type=FiniteFloat(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=TRAIN_DEFAULTS.seed, show_default=True, type=click.IntRange(0))
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result as JSON.")
@command
def probe(cache_path: Path, split: str, group_pattern: str, val_fraction: float, seed: int,
          json_path: Path | None) -> None:
    """Species from mean-pooled cached features (logistic regression), on the split `train` would use."""
    result = api.probe(cache_path, split=split, group_pattern=group_pattern, val_fraction=val_fraction, seed=seed,
                       json=json_path)
    if result.skipped:
        click.echo(f"species probe skipped: {result.skipped}")
        return
    click.echo(f"species accuracy {result.accuracy:.4f} on {result.n_val} {result.split}-split validation images")
    header = "true \\ predicted"
    width = max(len(header), *(len(name) for name in result.classes))
    click.echo(f"{header:>{width}}  " + " ".join(f"{k:>4}" for k in range(len(result.classes))))
    for k, (name, row) in enumerate(zip(result.classes, result.confusion)):
        click.echo(f"{name:>{width}}  " + " ".join(f"{count:>4}" for count in row) + f"   ({k})")


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_dir", required=True, type=input_dir, help="Run folder from `train`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for masks/, overlays/ and predictions.csv; never a run, cross-validation or sweep folder.")
@click.option("--backbone", default=None, help="Hub id or local folder [default: the one the run was trained on].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@workers_option
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out (listed, and as rows of predictions.csv).")
@click.option("--overwrite", is_flag=True,
              help="Replace the predictions already in --out (the files its predictions.csv lists; refused without).")
@device_option
@command
def predict(inputs: tuple[Path, ...], run_dir: Path, out: Path, backbone: str | None, batch_size: int,
            num_workers: int | None, skip_bad: bool, overwrite: bool, device: str, precision: str) -> None:
    """Predict masks for images or folders of images (no masks needed), at each image's own resolution.

    Writes a mask PNG and an overlay per image and predictions.csv; a run with several pixel classes writes
    label PNGs (palette: value = class index, colour = the class's), overlays with a legend, and each class's
    area (area_px:<class>) in predictions.csv.

    The backbone must be the one the run's cache was extracted with: its architecture and a digest of its
    weights are checked.
    """
    from fishseg.runtime import plural

    result = api.predict(inputs, run_dir, out, backbone=backbone, batch_size=batch_size, num_workers=num_workers,
                         skip_bad=skip_bad, overwrite=overwrite, device=device, precision=precision)
    for error in result.skipped:
        click.echo(f"skipped: {error}")
    click.echo(f"predictions written: {result.csv}"
               + (f" ({plural(len(result.skipped), 'image')} skipped)" if result.skipped else ""))


@click.command("demo")
@click.option("--out", default=Path("fishseg-demo"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--backbone", default=None, help="Hub id or local model folder [default: a random-init ViT-S/16].")
@click.option("--classes", default=3, show_default=True, type=click.IntRange(1, DEMO_SPECIES),
              help="Species folders of generated photos (Kaggle layout, binary masks: fish or not; for several "
                   "pixel classes see `extract --classes`).")
@click.option("--images-per-class", default=12, show_default=True, type=click.IntRange(DEMO_MIN_IMAGES))
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--image-size", default=EXTRACT_DEFAULTS.image_size, show_default=True, type=click.IntRange(16))
@click.option("--overwrite", is_flag=True,
              help="Replace the demo already in --out (its data, cache, run and report; nothing else there).")
@device_option
@command
def demo(out: Path, backbone: str | None, classes: int, images_per_class: int, epochs: int, image_size: int,
         overwrite: bool, device: str, precision: str) -> None:
    """Generate a small fish dataset and run extract → train → evaluate → report on it.

    OUT must be a new or empty folder, or an earlier demo with --overwrite.
    """
    result = api.demo(out, backbone=backbone, classes=classes, images_per_class=images_per_class, epochs=epochs,
                      image_size=image_size, overwrite=overwrite, device=device, precision=precision)
    click.echo(_summary(result.metrics, result.report))


def _process_counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}': expected process counts separated by commas, e.g. 1,2") from None
    if any(count < 1 for count in counts):
        raise click.BadParameter(f"'{value}': process counts must be at least 1")
    return counts


@click.command("bench")
@click.option("--images", default=64, show_default=True, type=click.IntRange(2), help="Generated 590×445 photos.")
@click.option("--image-size", default=EXTRACT_DEFAULTS.image_size, show_default=True, type=click.IntRange(16))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--backbone", default=None, help="Hub id or local model folder [default: a random-init ViT-S/16].")
@click.option("--scale", default=4, show_default=True, type=click.IntRange(2),
              help="The large cache of the memory measure holds this many times the images.")
@workers_option
@click.option("--processes", default="", metavar="N,N,…", callback=lambda _, __, value: _process_counts(value),
              help="Also time extract and train under torchrun with each process count (e.g. 1,2).")
@click.option("--sweep-epochs", default=5, show_default=True, type=click.IntRange(1),
              help="Epochs per config of the 8-config sweep whose overhead is measured.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@device_option
@command
def bench(images: int, image_size: int, batch_size: int, backbone: str | None, scale: int, num_workers: int | None,
          processes: tuple[int, ...], sweep_epochs: int, json_path: Path | None, device: str, precision: str) -> None:
    """Measure forward and extraction throughput, cached vs reference-style epochs, memory, cache storage,
    torchrun scaling (with --processes) and the overhead of a sweep."""
    from fishseg.bench.bench import BenchConfig, format_table, run_benchmark
    from fishseg.runtime import precision_scope, write_json

    config = BenchConfig(images=images, image_size=image_size, batch_size=batch_size, backbone=backbone, scale=scale,
                         device=device, num_workers=num_workers, processes=processes, sweep_epochs=sweep_epochs)
    with precision_scope(precision):
        results = run_benchmark(config)
    click.echo(format_table(results))
    if json_path:
        write_json(json_path, {"config": dataclasses.asdict(config), **results})
        click.echo(f"results written: {json_path}")


@click.command("export")
@click.option("--run", "run_dir", required=True, type=input_dir, help="Run folder from `train`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .onnx file to write (backbone + decoder as one graph).")
@click.option("--backbone", default=None, help="Hub id or local folder [default: the one the run was trained on].")
@click.option("--opset", default=None, type=click.IntRange(18), help="ONNX opset [default: the exporter's].")
@click.option("--overwrite", is_flag=True, help="Replace the file already at --out (refused without).")
@command
def export(run_dir: Path, out: Path, backbone: str | None, opset: int | None, overwrite: bool) -> None:
    """Export the run's best decoder and its backbone as one ONNX graph that runs without fishseg or torch.

    Input: uint8 RGB images N×3×S×S at the run's image size (normalised inside the graph); output: fish
    probabilities N×1×S×S float32 (mask: > 0.5), or for a run with several classes the class probabilities
    N×C×S×S (class: the arg max). The run's configs, backbone, classes and fishseg version are in the model's
    metadata. See docs/export.md.
    """
    result = api.export(run_dir, out, backbone=backbone, opset=opset, overwrite=overwrite)
    if not result.classes.binary:
        click.echo(f"classes {result.classes.describe()}")
    click.echo(f"input  {result.input.describe()}\noutput {result.output.describe()}\n"
               f"model written: {result.path} ({result.size_bytes / 1024 ** 2:.1f} MiB, opset {result.opset})")


@click.group()
@click.version_option(__version__)
def main() -> None:
    """fishseg: fish segmentation from frozen DINOv3 features cached once in HDF5."""


for _command in (extract, train, sweep, compare, evaluate, predict, probe, demo, bench, export):
    main.add_command(_command)
