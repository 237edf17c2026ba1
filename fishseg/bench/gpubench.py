"""GPU measures of ``fishseg bench --device cuda`` and ``scripts/gpu-check``: what issue 18's targets name.

1. backbone forward img/s at each of ``forward_batches`` (inputs generated on the device);
2. extraction img/s end to end on generated 590×445 PNGs (decode, resize, forward, HDF5 write);
3. one cached epoch of the seed recipe on a cache of ``cache_images`` generated ON THE DEVICE
   (``grid``×``grid``×``feature_dim`` float16 features, ``mask_size``² uint8 masks), and the host syncs
   per step of that epoch (``torch.cuda.set_sync_debug_mode("warn")`` warnings counted);
4. a sweep of ``SWEEP_GRID`` (12 configs) × ``sweep_epochs`` on that cache written to HDF5: wall time and
   the share inside epochs;
5. ``fishseg evaluate`` with its report on one of the sweep's runs (its validation split: a fifth of the cache).

Every size is a field of ``GpuBenchConfig``, so a CPU dry run (``TINY_GPU_BENCH``) exercises the same code in
seconds; its numbers mean nothing and nothing prints them as GPU figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fishseg.bench.memory_probe import epoch_runner, time_cached_epochs
from fishseg.config import IDENTITY, BackboneInfo, ExtractConfig, TrainConfig, shown
from fishseg.data.images import Sample
from fishseg.data.synthetic import write_demo_dataset
from fishseg.errors import FishsegError, Flag, render_flags
from fishseg.evaluation.evaluate import run_evaluation
from fishseg.features.extract import run_extraction
from fishseg.formats.cache import CacheWriter
from fishseg.models.backbone import Backbone, load_backbone, save_random_backbone
from fishseg.runtime import resolve_device, timed, write_json
from fishseg.training.sweep import run_sweep
from fishseg.training.train import InMemorySplit

__all__ = ["GpuBenchConfig", "TINY_GPU_BENCH", "SWEEP_GRID", "run_gpu_benchmark", "format_gpu_table",
           "require_cuda", "sweep_epochs", "generate_cache", "main"]

SWEEP_GRID = {"decoder": ("seed-cnn", "linear", "progressive"), "loss": ("bce", "bce+dice"), "lr": (1e-3, 3e-4)}
RESULTS_FILE = "gpu-bench.json"
WRITE_CHUNK = 512  # images generated on the device and written to HDF5 at once
ARGUMENT_FLAGS = {"device": Flag("--device"), "out": Flag("--out")}  # keywords its messages name, as main takes them


@dataclasses.dataclass(frozen=True)
class GpuBenchConfig:
    device: str = "cuda"
    forward_batches: tuple[int, ...] = (8, 64)
    forward_images: int = 512  # per batch size, after one warm-up batch
    image_size: int = 448
    extraction_images: int = 512  # generated 590×445 PNGs
    extraction_batch: int = 64
    cache_images: int = 9000
    grid: int = 28
    feature_dim: int = 384
    mask_size: int = 448
    preview_size: int = 224
    sweep_epochs: int = 20
    sweep_jobs: int = 4  # configs trained at a time on the one GPU (sweep --jobs)
    measure_compile: bool = True  # whether --compile is timed against plain epochs (costs a compile)
    sweep_budget_s: float = 150.0  # fewer epochs per config when the cached epoch projects the sweep past this
    backbone_layout: tuple[tuple[str, int], ...] = ()  # save_random_backbone layout; () = DINOv3 ViT-S/16

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in ("forward_images", "image_size", "extraction_images",
                                                        "extraction_batch", "cache_images", "grid", "feature_dim",
                                                        "mask_size", "preview_size", "sweep_epochs", "sweep_jobs")}
        bad = [name for name, value in sizes.items() if value < 1]
        if bad or not self.forward_batches or min(self.forward_batches) < 1:
            raise FishsegError(f"GPU bench sizes must be positive: {', '.join(bad) or 'forward_batches'}")
        if self.cache_images < 10:
            raise FishsegError("GPU bench cache_images must be at least 10 (a fifth of them validate)")


# a CPU dry run: the same measures on sizes that take seconds (tests, `scripts/gpu-check --device cpu`)
TINY_GPU_BENCH = GpuBenchConfig(device="cpu", forward_batches=(2, 4), forward_images=8, image_size=32,
                                extraction_images=6, extraction_batch=4, cache_images=20, grid=4, feature_dim=32,
                                mask_size=32, preview_size=16, sweep_epochs=1, sweep_jobs=2, measure_compile=False,
                                backbone_layout=(("hidden_size", 32), ("num_hidden_layers", 1),
                                                 ("num_attention_heads", 2), ("intermediate_size", 64),
                                                 ("patch_size", 8), ("num_register_tokens", 4)))


def require_cuda(device: str) -> None:
    """Asking for the GPU measures on a machine without CUDA is said plainly, before anything runs."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FishsegError(f"`device={shown(device)}`: no CUDA device here (torch {torch.__version__}, CUDA build "
                           f"{torch.version.cuda or 'none'}); the GPU measures need one, nothing was measured")


def _forward(backbone: Backbone, config: GpuBenchConfig, device: torch.device) -> dict[str, float]:
    """img/s of the backbone forward per batch size, on uint8 images generated on the device."""
    rates = {}
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in config.forward_batches:
        images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size), device=device,
                               generator=generator, dtype=torch.uint8)
        backbone(images)  # warm-up: allocations and kernel selection
        steps = max(1, config.forward_images // batch)
        seconds = timed(lambda: [backbone(images) for _ in range(steps)], device)
        rates[str(batch)] = steps * batch / seconds
    return rates


def _extraction(workdir: Path, backbone_dir: Path, config: GpuBenchConfig, device: torch.device) -> float:
    data = write_demo_dataset(workdir / "photos", classes=1, images_per_class=config.extraction_images)
    extract_config = ExtractConfig(backbone=str(backbone_dir), image_size=config.image_size)
    seconds = timed(lambda: run_extraction(data, workdir / "extracted.h5", extract_config,
                                           batch_size=config.extraction_batch, device=config.device,
                                           overwrite=True), device)
    return config.extraction_images / seconds


def generate_cache(config: GpuBenchConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features N×g×g×D float16 and masks N×S×S uint8 made on the device: a learnable pattern (feature channel
    0 follows the mask), so the decoders train as on real data; speed does not depend on the values."""
    generator = torch.Generator(device=device).manual_seed(0)
    n, g = config.cache_images, config.grid
    coarse = (torch.rand(n, 1, g // 2 or 1, g // 2 or 1, device=device, generator=generator) > 0.5).float()
    masks = F.interpolate(coarse, size=(config.mask_size,) * 2, mode="nearest")[:, 0].to(torch.uint8)
    features = torch.randn(n, g, g, config.feature_dim, device=device, generator=generator, dtype=torch.float16)
    features[..., 0] += (2 * F.interpolate(coarse, size=(g, g), mode="nearest")[:, 0] - 1).half()
    return features, masks


def _syncs_per_step(split: InMemorySplit, config: GpuBenchConfig, device: torch.device) -> float | None:
    """Host syncs per training step of the seed recipe, counted from the sync debug mode's warnings (CUDA)."""
    if device.type != "cuda":
        return None
    batch = TrainConfig().batch_size
    epoch = epoch_runner(split, config.feature_dim, batch, TrainConfig().decoder, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(warning.message) for warning in caught)
    return syncs / -(-len(split) // batch)


def compile_gain(split: InMemorySplit, config: GpuBenchConfig, device: torch.device,
                 plain_epoch_s: float) -> dict[str, float]:
    """``--compile`` against plain epochs over a run of ``sweep_epochs``: the compile is paid in the first
    epoch, so the run takes the first epoch plus the rest at the compiled steady pace."""
    epoch = epoch_runner(split, config.feature_dim, TrainConfig().batch_size, TrainConfig().decoder, device,
                         compiled=True)
    first_s, steady_s = timed(epoch, device), timed(epoch, device)
    epochs = config.sweep_epochs
    return {"first_epoch_s": first_s, "epoch_s": steady_s, "epochs": epochs,
            "run_s": first_s + (epochs - 1) * steady_s, "plain_run_s": epochs * plain_epoch_s}


def _write_cache(path: Path, features: torch.Tensor, masks: torch.Tensor, config: GpuBenchConfig) -> Path:
    """The generated tensors as a fishseg cache (uncompressed), copied to the host in chunks."""
    n = len(features)
    extract_config = ExtractConfig(backbone="generated", image_size=config.mask_size,
                                   preview_size=config.preview_size)
    info = BackboneInfo("generated", "dinov3_vit", max(1, config.mask_size // config.grid), config.feature_dim, 0,
                        True)
    samples = [Sample(f"generated/{i:05d}.png", Path("unused"), Path("unused"), "generated") for i in range(n)]
    previews = np.zeros((WRITE_CHUNK, config.preview_size, config.preview_size, 3), np.uint8)
    with CacheWriter(path, extract_config, info, samples, "none") as writer:
        for start in range(0, n, WRITE_CHUNK):
            stop = min(n, start + WRITE_CHUNK)
            writer.write(start, features[start:stop].cpu().numpy(), masks[start:stop].cpu().numpy(),
                         previews[:stop - start])
    return path


def sweep_epochs(config: GpuBenchConfig, epoch_s: float) -> int:
    """Epochs per config that keep the sweep within its budget (a check script must end in its time): the
    cached epoch projects it (a val pass of a fifth of the images, 1.25 epochs' work per epoch)."""
    configs = int(np.prod([len(values) for values in SWEEP_GRID.values()]))
    affordable = int(config.sweep_budget_s // max(epoch_s * 1.25 * configs, 1e-9))
    return max(1, min(config.sweep_epochs, affordable))


def _sweep_and_evaluate(cache_path: Path, workdir: Path, config: GpuBenchConfig, epoch_s: float) -> dict[str, Any]:
    epochs = sweep_epochs(config, epoch_s)
    grid = {**SWEEP_GRID, "epochs": (epochs,)}
    result = run_sweep(cache_path, workdir / "sweep", grid, device=config.device, jobs=config.sweep_jobs)
    run_dir = next(path.parent for path in sorted((workdir / "sweep").glob("*/run.json")))
    started = time.perf_counter()
    metrics = run_evaluation(cache_path, run_dir, workdir / "evaluate", device=config.device)
    return {"sweep": {"configs": result.configs, "epochs_per_config": epochs,
                      "epochs_asked": config.sweep_epochs, "jobs": config.sweep_jobs, "wall_s": result.wall_seconds,
                      "torch_startup_s": result.startup_seconds,
                      "inside_epochs_s": result.epoch_seconds, "inside_epochs_share": result.inside_epochs},
            "evaluate": {"images": metrics["n_images"], "seconds": time.perf_counter() - started}}


def run_gpu_benchmark(config: GpuBenchConfig, workdir: Path) -> dict[str, Any]:
    """Every GPU measure once, side by side, on a random-init backbone saved in ``workdir`` (no network)."""
    require_cuda(config.device)
    device = resolve_device(config.device)
    workdir.mkdir(parents=True, exist_ok=True)
    backbone_dir = save_random_backbone(workdir / "backbone", **dict(config.backbone_layout))
    extract_config = ExtractConfig(backbone=str(backbone_dir), image_size=config.image_size)
    backbone = load_backbone(str(backbone_dir), extract_config.mean, extract_config.std, device)
    forward = _forward(backbone, config, device)
    del backbone
    extraction = _extraction(workdir, backbone_dir, config, device)
    started = time.perf_counter()
    features, masks = generate_cache(config, device)
    split = InMemorySplit({IDENTITY: features}, masks, np.arange(config.cache_images))
    generated_s = timed(lambda: None, device) + time.perf_counter() - started
    epoch_s = time_cached_epochs(split, config.feature_dim, TrainConfig().batch_size, TrainConfig().decoder, device)
    syncs = _syncs_per_step(split, config, device)
    compiled = compile_gain(split, config, device, epoch_s) if config.measure_compile else None
    cache_path = _write_cache(workdir / "generated.h5", features, masks, config)
    del features, masks, split
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "config": dataclasses.asdict(config),
            "forward_images_per_s": forward, "extraction_images_per_s": extraction,
            "cache_generated_s": generated_s, "cached_epoch_s": epoch_s, "cached_epoch_images": config.cache_images,
            "host_syncs_per_step": syncs, "compile": compiled, **_sweep_and_evaluate(cache_path, workdir, config, epoch_s)}


def _compile_line(compiled: dict[str, float] | None) -> str:
    if compiled is None:
        return "G3 torch.compile                   not measured"
    return (f"G3 torch.compile, {compiled['epochs']} epochs      {compiled['run_s']:8.2f} s against "
            f"{compiled['plain_run_s']:.2f} s plain (first epoch {compiled['first_epoch_s']:.2f} s with the compile; "
            f"keep compiling only where it is the smaller)")


def format_gpu_table(results: dict[str, Any]) -> str:
    """The GPU measures as lines, each with the issue's target."""
    sweep, evaluation = results["sweep"], results["evaluate"]
    forward = ", ".join(f"batch {batch}: {rate:.0f}" for batch, rate in results["forward_images_per_s"].items())
    syncs = results["host_syncs_per_step"]
    return "\n".join([
        f"GPU measures on {results['device']} (torch {results['torch']}, CUDA {results['cuda']}), random-init backbone",
        f"G1 backbone forward img/s          {forward}",
        f"G2 extraction end to end           {results['extraction_images_per_s']:8.1f} img/s (target ≥ 1200)",
        f"G3 cached epoch, {results['cached_epoch_images']} images      {results['cached_epoch_s']:8.2f} s "
        f"(target ≤ 0.5); host syncs per step: {'n/a' if syncs is None else f'{syncs:.2f}'} (target 0)",
        _compile_line(results["compile"]),
        f"G4 sweep {sweep['configs']} configs × {sweep['epochs_per_config']} epochs, {sweep['jobs']} at a time "
        f"{sweep['wall_s']:8.1f} s "
        f"(target ≤ 120 for 20 epochs{'' if sweep['epochs_per_config'] == sweep['epochs_asked'] else ', cut to fit the budget'}), "
        f"{sweep['inside_epochs_share']:.0%} inside epochs",
        f"G5 evaluate with report            {evaluation['seconds']:8.1f} s on {evaluation['images']} validation images "
        f"(target ≤ 15 for 1800)",
    ])


def main(argv: list[str] | None = None) -> None:
    """``python -m fishseg.bench.gpubench --out DIR [--device cuda|cpu]``: the measures, printed and saved as JSON;
    ``--device cpu`` is the dry run on ``TINY_GPU_BENCH``'s sizes."""
    parser = argparse.ArgumentParser(prog="python -m fishseg.bench.gpubench", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-bench.json")
    parser.add_argument("--device", default="cuda", help="cuda (full sizes) or cpu (a dry run on tiny sizes)")
    parser.add_argument("--sweep-budget-s", type=float, default=GpuBenchConfig.sweep_budget_s)
    args = parser.parse_args(argv)
    base = TINY_GPU_BENCH if args.device == "cpu" else GpuBenchConfig(device=args.device)
    config = dataclasses.replace(base, sweep_budget_s=args.sweep_budget_s)
    try:
        with tempfile.TemporaryDirectory(prefix="fishseg-gpubench-") as scratch:  # the cache is ~7 GB: not in --out
            results = run_gpu_benchmark(config, Path(scratch))
    except FishsegError as error:
        raise SystemExit(f"error: {render_flags(str(error), ARGUMENT_FLAGS)}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / RESULTS_FILE, results)
    print(format_gpu_table(results))


if __name__ == "__main__":
    main()
