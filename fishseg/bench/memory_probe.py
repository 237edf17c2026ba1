"""One cached-training epoch measured in a fresh process (``fishseg bench``, measure 4).

Kept apart from ``fishseg.bench.bench`` so that the spawned process imports only the training stack
(2 s and 240 MB instead of 7 s and 450 MB with transformers), which keeps its memory baseline clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fishseg.formats.cache import FeatureCache
from fishseg.models.decoders import build_decoder
from fishseg.runtime import resolve_device, timed
from fishseg.training.train import InMemorySplit, Objective, StreamedSplit, run_epoch

MB = 1024 * 1024


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def epoch_runner(split: InMemorySplit | StreamedSplit, feature_dim: int, batch_size: int, decoder_name: str,
                 device: torch.device, *, compiled: bool = False,
                 objective: Objective = Objective()) -> Callable[[], None]:
    """One training epoch over ``split`` as a call (AdamW at 1e-3, seed 0), each call continuing with the same
    decoder (through ``torch.compile`` when ``compiled``) and optimizer; ``objective``: the pixel classes and
    loss (binary BCE by default)."""
    decoder = build_decoder(decoder_name, feature_dim, objective.classes.channels).to(device)
    model = torch.compile(decoder) if compiled else decoder
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    return lambda: run_epoch(model, split, batch_size, device, optimizer, generator, objective=objective)


def time_cached_epochs(split: InMemorySplit | StreamedSplit, feature_dim: int, batch_size: int, decoder_name: str,
                       device: torch.device, repeats: int = 1, objective: Objective = Objective()) -> float:
    """Seconds of one training epoch over ``split`` after a warm-up epoch, the best of ``repeats``."""
    epoch = epoch_runner(split, feature_dim, batch_size, decoder_name, device, objective=objective)
    epoch()  # warm-up
    return timed(epoch, device, repeats)


def measure_training(cache_path: str, stream: bool, batch_size: int, decoder_name: str, device_name: str,
                     repeats: int = 1) -> dict[str, float]:
    """Runs in a fresh process: peak RSS growth over the imported-and-idle process, and one epoch's seconds.

    Import-time allocations set a high-water mark that loading a small cache would not pass, so the
    mark is reset (``/proc/self/clear_refs``, Linux) before the measured work.
    """
    device = resolve_device(device_name)
    with FeatureCache(Path(cache_path)) as cache:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        baseline = _status_mb("VmRSS")
        indices = np.arange(len(cache))
        split = StreamedSplit(cache, indices) if stream else InMemorySplit.from_cache(cache, indices)
        seconds = time_cached_epochs(split, cache.backbone.feature_dim, batch_size, decoder_name, device, repeats)
        peak = _status_mb("VmHWM")
    result = {"images": len(indices), "epoch_seconds": seconds, "peak_rss_growth_mb": peak - baseline}
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
    return result
