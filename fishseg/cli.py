"""Command line: ``fishseg extract|train|evaluate|demo`` and the three top-level scripts.

Each command parses its options and calls one ``run_*`` function. A ``FishsegError`` becomes a
one-line ``Error: ...`` and exit status 2; anything else is a bug and keeps its traceback.
Stage modules are imported inside the commands so that ``--help`` answers without loading
transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from fishseg import __version__
from fishseg.config import (AUGMENTATIONS, COMPRESSIONS, DEFAULT_BACKBONE, DEFAULT_COMPRESSION, LOSSES, SCHEDULES,
                            ExtractConfig, TrainConfig)
from fishseg.decoders import DECODERS
from fishseg.distributed import is_main_process, under_torchrun
from fishseg.errors import FishsegError

DEVICES = click.Choice(["auto", "cpu", "cuda"])
TRAIN_DEFAULTS = TrainConfig()
EXTRACT_DEFAULTS = ExtractConfig()


INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C
DISTRIBUTED_COMMANDS = {"extract", "train"}  # the others would run whole on every torchrun process


class UserError(click.ClickException):
    exit_code = 2


def command(function: Callable[..., Any]) -> Callable[..., Any]:
    """Configure logging once and turn user errors into one-line messages."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            if under_torchrun() and function.__name__ not in DISTRIBUTED_COMMANDS:
                raise FishsegError(f"`{function.__name__}` runs in one process; start it without torchrun "
                                   f"(only {' and '.join(sorted(DISTRIBUTED_COMMANDS))} use several)")
            return function(*args, **kwargs)
        except FishsegError as error:
            raise UserError(str(error)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted. Finished work is kept: run the same command again to resume.", err=True)
            sys.exit(INTERRUPTED)

    return wrapper


def device_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", type=DEVICES, default="auto", show_default=True,
                        help="auto uses CUDA (with bf16 autocast) when present.")(function)


def workers_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--num-workers", default=None, type=click.IntRange(0),
                        help="Image decoding workers [default: half the cores].")(function)


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
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@workers_option
@click.option("--compression", default=DEFAULT_COMPRESSION, show_default=True, type=click.Choice(COMPRESSIONS),
              help="HDF5 compression of the features (see `fishseg bench` for the trade-off).")
@click.option("--overwrite", is_flag=True, help="Replace a finished cache (kept, or refused when stale, without it).")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out with a warning (recorded in the cache).")
@device_option
@command
def extract(data_root: Path, out: Path, backbone: str, image_size: int, preview_size: int, batch_size: int,
            num_workers: int | None, compression: str, overwrite: bool, skip_bad: bool, device: str) -> None:
    """Run the frozen backbone once over every image and write patch features, masks and previews to one HDF5 cache.

    Resumable: stopped at any point, the same command continues where it stopped. Under
    `torchrun --nproc-per-node N` each process extracts a contiguous share of the images.
    """
    from fishseg.extract import run_extraction

    config = ExtractConfig(backbone=backbone, image_size=image_size, preview_size=preview_size)
    run_extraction(data_root, out, config, batch_size=batch_size, num_workers=num_workers, device=device,
                   compression=compression, overwrite=overwrite, skip_bad=skip_bad)
    if is_main_process():
        click.echo(f"cache ready: {out}")


@click.command("train")
@click.option("--cache", "cache_path", required=True, type=input_file, help="Cache from `extract`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder to write.")
@click.option("--decoder", default=TRAIN_DEFAULTS.decoder, show_default=True, type=click.Choice(sorted(DECODERS)))
@click.option("--epochs", default=TRAIN_DEFAULTS.epochs, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=TRAIN_DEFAULTS.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=TRAIN_DEFAULTS.lr, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--weight-decay", default=TRAIN_DEFAULTS.weight_decay, show_default=True, type=click.FloatRange(min=0))
@click.option("--val-fraction", default=TRAIN_DEFAULTS.val_fraction, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=TRAIN_DEFAULTS.seed, show_default=True, help="Drives split, init and batch order.")
@click.option("--split", default=TRAIN_DEFAULTS.split, show_default=True, type=click.Choice(["random", "grouped"]),
              help="random reproduces the reference; grouped keeps near-duplicates on one side (see README).")
@click.option("--group-pattern", default="", help="Regex whose match in an image id names its group "
                                                  "[default: the cache's near-duplicate groups].")
@click.option("--cv", "folds", default=0, type=click.IntRange(0), help="K-fold cross-validation: K runs in OUT/fold-k "
                                                                        "and OUT/cv.json with mean ± std.")
@click.option("--loss", default=TRAIN_DEFAULTS.loss, show_default=True, type=click.Choice(LOSSES))
@click.option("--schedule", default=TRAIN_DEFAULTS.schedule, show_default=True, type=click.Choice(SCHEDULES),
              help="cosine: linear warm-up over --warmup-epochs, then cosine decay to 0.")
@click.option("--warmup-epochs", default=TRAIN_DEFAULTS.warmup_epochs, show_default=True, type=click.IntRange(0))
@click.option("--augment", default=TRAIN_DEFAULTS.augment, show_default=True, type=click.Choice(AUGMENTATIONS),
              help="flips: random flips and 90° rotations of the cached grid and mask, per batch.")
@click.option("--stream/--in-memory", default=None,
              help="Read batches from the cache file, or hold features in memory [default: in memory when "
                   "they take under half the free memory].")
@device_option
@command
def train(cache_path: Path, out: Path, decoder: str, epochs: int, batch_size: int, lr: float, weight_decay: float,
          val_fraction: float, seed: int, split: str, group_pattern: str, folds: int, loss: str, schedule: str,
          warmup_epochs: int, augment: str, stream: bool | None, device: str) -> None:
    """Train a decoder from the cached features only (no images, no backbone).

    Under `torchrun --nproc-per-node N` each process computes a share of every batch (DDP); the run
    equals a one-process run up to floating-point order.
    """
    from fishseg.crossval import run_cross_validation
    from fishseg.train import run_training

    config = TrainConfig(decoder=decoder, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         val_fraction=val_fraction, seed=seed, split=split, group_pattern=group_pattern, loss=loss,
                         schedule=schedule, warmup_epochs=warmup_epochs, augment=augment)
    if folds:
        cv = run_cross_validation(cache_path, out, config, folds, device=device, stream=stream)
        if not is_main_process():
            return
        summary = cv["summary"]
        click.echo(f"{folds}-fold {split} cross-validation: " + ", ".join(
            f"{name} {value['mean']:.4f} ± {value['std']:.4f}" for name, value in summary.items()))
        click.echo(f"written: {out}/cv.json")
        return
    run = run_training(cache_path, out, config, device=device, stream=stream)
    if is_main_process():
        click.echo(f"run written: {out} (best val IoU {run['best_val_iou']:.4f} at epoch {run['best_epoch']}; "
                   f"{run['split']['val_with_duplicate_in_train']} val images have a near-duplicate in train)")


@click.command("evaluate")
@click.option("--cache", "cache_path", required=True, type=input_file, help="The cache the run was trained on.")
@click.option("--run", "run_dir", required=True, type=input_dir, help="Run folder from `train`.")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder [default: RUN/report].")
@device_option
@command
def evaluate(cache_path: Path, run_dir: Path, out: Path | None, device: str) -> None:
    """Score the run's best checkpoint on its validation split and write metrics and a report."""
    from fishseg.evaluate import run_evaluation

    out = out or run_dir / "report"
    metrics = run_evaluation(cache_path, run_dir, out, device=device)
    click.echo(_summary(metrics, out))


def _summary(metrics: dict[str, Any], out: Path) -> str:
    from fishseg.runtime import plural

    lines = [f"{plural(metrics['n_images'], 'validation image')}: mean IoU {metrics['mean_iou']:.4f}, "
             f"reference batch IoU {metrics['reference_batch_iou']:.4f}, mean Dice {metrics['mean_dice']:.4f} "
             f"(backbone {metrics['backbone']}); {metrics['val_with_duplicate_in_train']} with a near-duplicate "
             f"in training"]
    if metrics["random_init"]:
        lines.append("NOTE: the backbone is RANDOM-INIT; these numbers say nothing about DINOv3 features.")
    lines.append(f"report: {out}")
    return "\n".join(lines)


@click.command("probe")
@click.option("--cache", "cache_path", required=True, type=input_file, help="Cache from `extract`.")
@click.option("--split", default=TRAIN_DEFAULTS.split, show_default=True, type=click.Choice(["random", "grouped"]))
@click.option("--group-pattern", default="", help="Regex whose match in an image id names its group.")
@click.option("--val-fraction", default=TRAIN_DEFAULTS.val_fraction, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=TRAIN_DEFAULTS.seed, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result as JSON.")
@command
def probe(cache_path: Path, split: str, group_pattern: str, val_fraction: float, seed: int,
          json_path: Path | None) -> None:
    """Species from mean-pooled cached features (logistic regression), on the split `train` would use."""
    from fishseg.cache import FeatureCache
    from fishseg.probe import run_probe
    from fishseg.runtime import write_json
    from fishseg.train import split_indices

    config = TrainConfig(val_fraction=val_fraction, seed=seed, split=split, group_pattern=group_pattern)
    with FeatureCache(cache_path) as cache:
        train_idx, val_idx, _ = split_indices(cache, config)
        result = run_probe(cache, train_idx, val_idx)
    if "skipped" in result:
        click.echo(f"species probe skipped: {result['skipped']}")
    else:
        click.echo(f"species accuracy {result['accuracy']:.4f} on {result['n_val']} {split}-split validation images")
        header = "true \\ predicted"
        width = max(len(header), *(len(name) for name in result["classes"]))
        click.echo(f"{header:>{width}}  " + " ".join(f"{k:>4}" for k in range(len(result["classes"]))))
        for k, (name, row) in enumerate(zip(result["classes"], result["confusion"])):
            click.echo(f"{name:>{width}}  " + " ".join(f"{count:>4}" for count in row) + f"   ({k})")
    if json_path:
        write_json(json_path, result)


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_dir", required=True, type=input_dir, help="Run folder from `train`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for masks/, overlays/ and predictions.csv.")
@click.option("--backbone", default=None, help="Hub id or local folder [default: the one the run was trained on].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@workers_option
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out (listed, and as rows of predictions.csv).")
@device_option
@command
def predict(inputs: tuple[Path, ...], run_dir: Path, out: Path, backbone: str | None, batch_size: int,
            num_workers: int | None, skip_bad: bool, device: str) -> None:
    """Predict masks for images or folders of images (no masks needed), at each image's own resolution."""
    from fishseg.predict import run_prediction
    from fishseg.runtime import plural

    csv_path, skipped = run_prediction(run_dir, list(inputs), out, backbone=backbone, batch_size=batch_size,
                                       num_workers=num_workers, device=device, skip_bad=skip_bad)
    for error in skipped:
        click.echo(f"skipped: {error}")
    click.echo(f"predictions written: {csv_path}" + (f" ({plural(len(skipped), 'image')} skipped)" if skipped else ""))


@click.command("demo")
@click.option("--out", default=Path("fishseg-demo"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--backbone", default=None, help="Hub id or local model folder [default: a random-init ViT-S/16].")
@click.option("--classes", default=3, show_default=True, type=click.IntRange(1, 4))
@click.option("--images-per-class", default=12, show_default=True, type=click.IntRange(2))
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--image-size", default=EXTRACT_DEFAULTS.image_size, show_default=True, type=click.IntRange(16))
@device_option
@command
def demo(out: Path, backbone: str | None, classes: int, images_per_class: int, epochs: int, image_size: int,
         device: str) -> None:
    """Generate a small fish dataset and run extract → train → evaluate → report on it."""
    from fishseg.demo import run_demo
    from fishseg.evaluate import METRICS_FILE
    from fishseg.runtime import read_json

    report = run_demo(out, backbone=backbone, classes=classes, images_per_class=images_per_class, epochs=epochs,
                      image_size=image_size, device=device)
    click.echo(_summary(read_json(report.parent / METRICS_FILE), report))


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
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@device_option
@command
def bench(images: int, image_size: int, batch_size: int, backbone: str | None, scale: int, num_workers: int | None,
          processes: tuple[int, ...], json_path: Path | None, device: str) -> None:
    """Measure forward and extraction throughput, cached vs reference-style epochs, memory and cache storage."""
    from fishseg.bench import BenchConfig, format_table, run_benchmark
    from fishseg.runtime import write_json

    config = BenchConfig(images=images, image_size=image_size, batch_size=batch_size, backbone=backbone, scale=scale,
                         device=device, num_workers=num_workers, processes=processes)
    results = run_benchmark(config)
    click.echo(format_table(results))
    if json_path:
        write_json(json_path, {"config": dataclasses.asdict(config), **results})
        click.echo(f"results written: {json_path}")


@click.group()
@click.version_option(__version__)
def main() -> None:
    """fishseg: fish segmentation from frozen DINOv3 features cached once in HDF5."""


for _command in (extract, train, evaluate, predict, probe, demo, bench):
    main.add_command(_command)
