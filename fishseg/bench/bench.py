"""``fishseg bench``: what the cache buys, measured side by side in one run on generated images.

1. bare backbone forward (decoded tensors already in memory);
2. extraction end to end (decode + resize + forward + HDF5 write), as a ratio of 1;
3. a reference-style epoch (decode + backbone + decoder step per batch, as the notebook trained)
   against an epoch from the cache: same images, decoder and batch size (cached epochs: best of 3); and the
   cached epoch with 10 pixel classes (background + 9 species, cross-entropy) against it, on the same features;
4. peak memory and epoch time of cached training, in memory and streamed, at two cache sizes
   (each in a fresh process, so one peak does not hide another);
5. size and random-read throughput of the cache for each compression;
6. (with ``--processes 1,2,…``) extraction and training as whole commands under torchrun with each
   process count, as images/s and as a ratio of the first count;
7. a sweep of 8 configs (``SWEEP_GRID``) of a few epochs over the cache: the share of its wall time spent
   inside epochs, the rest being the sweep's own overhead (loading, checkpoints, scoring, leaderboard);
8. ``evaluate`` of one of the sweep's runs on its validation images: scores alone, then with the report;
9. (with ``--device cuda``) the GPU measures of ``fishseg.bench.gpubench`` at full size; without CUDA, asking for
   them stops with one line before anything runs.

Usage: ``fishseg bench [--images 64] [--processes 1,2] [--json PATH]``. The stages run through the public API
(``fishseg.api``); under torchrun, through ``fishseg.bench.call`` with the API's keywords.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fishseg import api
from fishseg.bench.call import torchrun_call
from fishseg.bench.gpubench import GpuBenchConfig, format_gpu_table, require_cuda, run_gpu_benchmark
from fishseg.bench.memory_probe import MB, measure_training, time_cached_epochs
from fishseg.classes import Classes
from fishseg.config import COMPRESSIONS, ExtractConfig
from fishseg.data.images import ExtractionDataset, Sample, discover_samples
from fishseg.data.synthetic import SPECIES, write_demo_dataset
from fishseg.errors import FishsegError
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.formats.cache import CacheWriter, FeatureCache
from fishseg.formats.runs import HISTORY_FILE
from fishseg.models.backbone import load_backbone, save_random_backbone
from fishseg.models.decoders import build_decoder
from fishseg.runtime import default_num_workers, read_json, resolve_device, timed
from fishseg.training.train import InMemorySplit, Objective, decoder_step
from fishseg.version import __version__

EPOCH_REPEATS = 3  # cached epochs are cheap: report the best of three
CLASSES_MEASURED = 10  # measure 3's epoch with pixel classes: Kaggle's background + 9 species
CPU = torch.device("cpu")  # timing work that runs off the device (file reads, other processes): no sync
SCALING_EPOCHS = 4  # measure 6: the first epoch warms up, the best of the others is reported
SWEEP_GRID = {"decoder": ("seed-cnn", "linear"), "loss": ("bce", "bce+dice"), "lr": (1e-3, 3e-4)}  # measure 7


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    images: int = 64  # generated 590×445 photos
    image_size: int = 448
    batch_size: int = 8
    backbone: str | None = None  # None: a random-init ViT-S/16 (same cost as the trained one)
    decoder: str = "seed-cnn"
    scale: int = 4  # the large cache of measure 4 has scale × images
    device: str = "auto"
    num_workers: int | None = None
    processes: tuple[int, ...] = ()  # measure 6 runs when given
    sweep_epochs: int = 5  # per config of measure 7


def _forward_throughput(backbone: Any, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    backbone(images[:batch_size])  # warm-up: first-call allocations and kernel selection
    seconds = timed(lambda: [backbone(chunk) for chunk in images.split(batch_size)], device)
    return len(images) / seconds


def _reference_epoch(backbone: Any, samples: list[Sample], config: BenchConfig, device: torch.device) -> float:
    """Seconds for one epoch as the reference trained: decode, backbone and decoder step for every batch."""
    loader = torch.utils.data.DataLoader(
        ExtractionDataset(samples, config.image_size, 16), batch_size=config.batch_size, shuffle=True,
        num_workers=_workers(config), generator=torch.Generator().manual_seed(0))
    decoder = build_decoder(config.decoder, backbone.info.feature_dim).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    decoder.train()

    def epoch() -> None:
        for images, masks, _, _ in loader:
            decoder_step(decoder, backbone(images).clone(), masks, device, optimizer)

    return timed(epoch, device)


def _cached_epochs(cache_path: Path, config: BenchConfig, device: torch.device) -> tuple[float, float]:
    """Seconds of a cached epoch with binary masks and, on the same features, with ``CLASSES_MEASURED`` pixel
    classes (each image's fish relabelled as one of the other classes, cross-entropy): measured side by side."""
    with FeatureCache(cache_path) as cache:
        split = InMemorySplit.from_cache(cache, np.arange(len(cache)))
        feature_dim = cache.backbone.feature_dim
    species = 1 + torch.arange(len(split.masks)) % (CLASSES_MEASURED - 1)
    labelled = InMemorySplit(split.features, split.masks * species[:, None, None].to(torch.uint8),
                             np.arange(len(split)))
    classes = Classes.several(tuple(f"class{k}" for k in range(CLASSES_MEASURED)))
    timing = dict(batch_size=config.batch_size, decoder_name=config.decoder, device=device, repeats=EPOCH_REPEATS)
    return (time_cached_epochs(split, feature_dim, **timing),
            time_cached_epochs(labelled, feature_dim, **timing, objective=Objective(classes, "ce")))


def _workers(config: BenchConfig) -> int:
    return default_num_workers() if config.num_workers is None else config.num_workers


def _copy_cache(source: Path, target: Path, repeat: int, compression: str) -> Path:
    """A cache with ``repeat`` copies of every image of ``source`` (content is irrelevant to speed and memory)."""
    with FeatureCache(source) as cache:
        everything = np.arange(len(cache))
        features, masks, previews = cache.features(everything), cache.masks(everything), cache.previews(everything)
        samples = [Sample(f"{copy}/{image_id}", Path(image_id), Path(image_id), cache.class_names[k])
                   for copy in range(repeat) for image_id, k in zip(cache.image_ids, cache.class_index)]
        config, backbone = cache.config, cache.backbone
    with CacheWriter(target, config, backbone, samples, compression) as writer:
        for copy in range(repeat):
            writer.write(copy * len(features), features, masks, previews)
    return target


def _memory(cache_path: Path, workdir: Path, config: BenchConfig) -> list[dict[str, Any]]:
    large = _copy_cache(cache_path, workdir / "large.h5", config.scale, "none")
    rows = []
    context = multiprocessing.get_context("spawn")
    for path in (cache_path, large):
        for stream in (False, True):
            with context.Pool(1) as pool:
                result = pool.apply(measure_training, (str(path), stream, config.batch_size, config.decoder,
                                                        config.device, EPOCH_REPEATS))
            rows.append({"features": "streamed" if stream else "in memory", **result})
    return rows


def _storage(cache_path: Path, workdir: Path) -> list[dict[str, Any]]:
    """File size and random-order per-image read throughput of the features for each compression."""
    rows = []
    for compression in COMPRESSIONS:
        path = _copy_cache(cache_path, workdir / f"storage-{compression}.h5", 1, compression)
        with FeatureCache(path) as cache:
            order = np.random.default_rng(0).permutation(len(cache))
            dataset = cache.file["features"]
            seconds = timed(lambda: [dataset[int(i)] for i in order], CPU)
            payload = dataset.size * dataset.dtype.itemsize
        rows.append({"compression": compression, "file_mb": path.stat().st_size / MB,
                     "read_mb_per_s": payload / MB / seconds})
    return rows


def _run(command: list[Any]) -> None:
    """Run a command; a failure is reported with the end of its processes' output."""
    command = [str(part) for part in command]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        processes_output = result.stderr.rsplit("Traceback (most recent call last):", 1)[0]  # not torchrun's own
        raise FishsegError(f"benchmark command failed (exit {result.returncode}): {' '.join(command)}\n"
                           f"{processes_output[-3000:]}")


def _scaling(data: Path, cache_path: Path, backbone: str, workdir: Path, config: BenchConfig) -> list[dict[str, Any]]:
    """Measure 6: ``fishseg.extract`` and ``fishseg.train`` under torchrun with each process count, timed as
    whole processes (start-up included)."""
    rows = []
    for processes in config.processes:
        extraction = timed(lambda: _run(torchrun_call(
            processes, "extract", data_root=data, out=workdir / f"scaling-{processes}.h5", backbone=backbone,
            image_size=config.image_size, batch_size=config.batch_size, num_workers=config.num_workers,
            device=config.device)), CPU)
        run_dir = workdir / f"scaling-{processes}"
        training = timed(lambda: _run(torchrun_call(
            processes, "train", cache=cache_path, out=run_dir, decoder=config.decoder, epochs=SCALING_EPOCHS,
            batch_size=config.batch_size, device=config.device)), CPU)
        epoch = min(row["seconds"] for row in read_json(run_dir / HISTORY_FILE)["epochs"][1:])
        rows.append({"processes": processes, "extraction_s": extraction,
                     "extraction_images_per_s": config.images / extraction, "training_s": training,
                     "epoch_s": epoch, "epoch_images_per_s": config.images / epoch})
    for row in rows:
        for measure in ("extraction_images_per_s", "epoch_images_per_s"):
            row[f"{measure}_ratio"] = row[measure] / rows[0][measure]
    return rows


def _sweep_overhead(cache_path: Path, workdir: Path, config: BenchConfig) -> dict[str, Any]:
    """Measure 7: `fishseg sweep` of the 8 configs of SWEEP_GRID; the share of its wall time inside epochs."""
    grid = {**SWEEP_GRID, "epochs": (config.sweep_epochs,), "batch_size": (config.batch_size,)}
    result = api.sweep(cache_path, workdir / "sweep", grid=grid, device=config.device)
    return {"configs": result.configs, "epochs_per_config": config.sweep_epochs, "wall_s": result.wall_seconds,
            "torch_startup_s": result.startup_seconds, "inside_epochs_s": result.epoch_seconds,
            "inside_epochs_share": result.inside_epochs}


def _evaluate(cache_path: Path, workdir: Path, config: BenchConfig) -> dict[str, Any]:
    """Measure 8: ``evaluate`` of the sweep's first run, scores only (what folds pay), then with the report."""
    run_dir = next(path.parent for path in sorted((workdir / "sweep").glob("*/run.json")))
    scoring = timed(lambda: run_evaluation(cache_path, run_dir, workdir / "scores", device=config.device,
                                           report=False), CPU)
    started = time.perf_counter()
    images = api.evaluate(cache_path, run_dir, out=workdir / "report", device=config.device).n_images
    return {"images": images, "scores_s": scoring, "with_report_s": time.perf_counter() - started}


def _environment(config: BenchConfig, device: torch.device, backbone: Any) -> dict[str, Any]:
    return {
        "fishseg": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "threads": torch.get_num_threads(), "workers": _workers(config), "image_size": config.image_size,
        "photo_size": "590×445", "images": config.images, "batch_size": config.batch_size,
        "backbone": backbone.info.name, "random_init": backbone.info.random_init,
        "feature_dim": backbone.info.feature_dim,
    }


def run_benchmark(config: BenchConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Run every measure once, side by side, and return them with the environment."""
    require_cuda(config.device)
    with tempfile.TemporaryDirectory(prefix="fishseg-bench-") as scratch:
        workdir = workdir or Path(scratch)
        classes = len(SPECIES) if config.images % len(SPECIES) == 0 else 1  # exactly config.images photos
        data = write_demo_dataset(workdir / "data", classes=classes, images_per_class=config.images // classes)
        samples = discover_samples(data)
        backbone_name = config.backbone or str(save_random_backbone(workdir / "backbone"))
        device = resolve_device(config.device)
        extract_config = ExtractConfig(backbone=backbone_name, image_size=config.image_size)
        backbone = load_backbone(backbone_name, extract_config.mean, extract_config.std, device)
        dataset = ExtractionDataset(samples, config.image_size, extract_config.preview_size)
        decoded = torch.stack([dataset[i][0] for i in range(len(samples))])
        forward = _forward_throughput(backbone, decoded, config.batch_size, device)
        cache_path = workdir / "cache.h5"
        extraction_seconds = timed(lambda: api.extract(
            data, cache_path, config=extract_config, batch_size=config.batch_size, num_workers=config.num_workers,
            device=config.device, overwrite=True), device)
        reference = _reference_epoch(backbone, samples, config, device)
        cached, cached_classes = _cached_epochs(cache_path, config, device)
        scaling = _scaling(data, cache_path, backbone_name, workdir, config) if config.processes else []
        sweep = _sweep_overhead(cache_path, workdir, config)
        gpu = (run_gpu_benchmark(GpuBenchConfig(device=config.device), workdir / "gpu") if device.type == "cuda"
               else None)
        return {
            "environment": _environment(config, device, backbone),
            "forward_images_per_s": forward,
            "extraction_images_per_s": len(samples) / extraction_seconds,
            "extraction_vs_forward": len(samples) / extraction_seconds / forward,
            "reference_epoch_s": reference, "cached_epoch_s": cached, "cached_speedup": reference / cached,
            "cached_epoch_classes_s": cached_classes, "classes_vs_binary_epoch": cached_classes / cached,
            "memory": _memory(cache_path, workdir, config),
            "storage": _storage(cache_path, workdir),
            "scaling": scaling,
            "sweep": sweep,
            "evaluate": _evaluate(cache_path, workdir, config),
            "gpu": gpu,
        }


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table with ratios and the targets they answer."""
    env = results["environment"]
    backbone = f"{env['backbone']}" + (" (random-init)" if env["random_init"] else "")
    lines = [
        f"fishseg bench: {env['images']} photos {env['photo_size']} → {env['image_size']}², "
        f"batch {env['batch_size']}, "
        f"{env['device']}, {env['threads']} threads, {env['workers']} workers, torch {env['torch']}",
        f"backbone {backbone}",
        "",
        f"1 backbone forward (in memory)     {results['forward_images_per_s']:8.2f} img/s",
        f"2 extraction end to end            {results['extraction_images_per_s']:8.2f} img/s   "
        f"{results['extraction_vs_forward']:.2f}× of 1 (target ≥ 0.9)",
        f"3 reference-style epoch            {results['reference_epoch_s']:8.2f} s",
        f"  cached epoch                     {results['cached_epoch_s']:8.2f} s       "
        f"{results['cached_speedup']:.1f}× faster (target ≥ 25)",
        f"  cached epoch, {CLASSES_MEASURED} pixel classes     {results['cached_epoch_classes_s']:8.2f} s       "
        f"{results['classes_vs_binary_epoch']:.2f}× the binary cached epoch",
        "4 cached training      images  epoch s  peak RSS growth MB",
    ]
    for row in results["memory"]:
        lines.append(f"  {row['features']:<18} {row['images']:>7} {row['epoch_seconds']:>8.2f} "
                     f"{row['peak_rss_growth_mb']:>18.1f}")
    memory = results["memory"]
    lines.append(f"  streamed / in-memory epoch time at {memory[-1]['images']} images: "
                 f"{memory[-1]['epoch_seconds'] / memory[-2]['epoch_seconds']:.2f}× (target ≤ 1.3)")
    lines.append("5 cache storage        file MB  random read MB/s")
    for row in results["storage"]:
        lines.append(f"  {row['compression']:<18} {row['file_mb']:>8.1f} {row['read_mb_per_s']:>17.0f}")
    lines += _scaling_lines(results["scaling"])
    sweep = results["sweep"]
    lines.append(f"7 sweep of {sweep['configs']} configs × {sweep['epochs_per_config']} epochs  "
                 f"{sweep['wall_s']:6.1f} s ({sweep['torch_startup_s']:.1f} s torch start-up), "
                 f"{sweep['inside_epochs_share']:.0%} of the rest inside epochs (target ≥ 90%)")
    evaluation = results["evaluate"]
    lines.append(f"8 evaluate on {evaluation['images']} validation images  {evaluation['scores_s']:6.2f} s scores, "
                 f"{evaluation['with_report_s']:.2f} s with the report (target: report ≤ scores on the CPU)")
    if results["gpu"]:
        lines += ["", format_gpu_table(results["gpu"])]
    return "\n".join(lines)


def _scaling_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["6 torchrun scaling: not run (pass --processes 1,2)"]
    lines = ["6 torchrun   extraction (whole command)   training epoch (train + val pass)",
             "  processes        s   img/s   ratio           s   img/s   ratio"]
    for row in rows:
        lines.append(f"  {row['processes']:>9} {row['extraction_s']:>8.1f} {row['extraction_images_per_s']:>7.2f} "
                     f"{row['extraction_images_per_s_ratio']:>6.2f}× {row['epoch_s']:>11.2f} "
                     f"{row['epoch_images_per_s']:>7.1f} {row['epoch_images_per_s_ratio']:>6.2f}×")
    return lines
