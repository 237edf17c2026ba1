"""The cache held whole where training computes: on the GPU when it fits there, else in host memory.

Every image's features (per view, in the dtype the caller computes with; by default as stored), masks
(uint8) and, for decoders that see the image, previews are copied chunk by chunk from the HDF5 file into
tensors allocated once on the target device: no full host copy on the way, so a machine with little host
RAM (Colab's 12 GB) can hold on its GPU a cache it could not hold in memory. Batches are then gathered
by index on that device. On the CPU the tensors are exactly those a whole read would give.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch

from fishseg.cache import FeatureCache, feature_name

__all__ = ["DEVICE_MARGIN", "ResidentViews", "fits_on_device", "resident_bytes", "upload"]

DEVICE_MARGIN = 2 << 30  # bytes kept free on a GPU for the decoder, its activations, the optimizer and the allocator
CHUNK_BYTES = 64 << 20  # of HDF5 data read (and copied) at a time


def resident_bytes(cache: FeatureCache, dtype: torch.dtype | None, guides: bool) -> int:
    """Bytes the whole cache takes held in ``dtype`` (None: as stored), every view included, with its masks
    and (``guides``) previews."""
    features, per_image = [feature_name(view) for view in cache.views], 0
    for name in (*features, "masks", *(("previews",) if guides else ())):
        stored = cache.file[name]
        size = dtype.itemsize if dtype is not None and name in features else stored.dtype.itemsize
        per_image += int(np.prod(stored.shape[1:])) * size
    return per_image * len(cache)


def fits_on_device(cache: FeatureCache, device: torch.device, dtype: torch.dtype | None, guides: bool) -> bool:
    """Whether the cache fits in the GPU's free memory with ``DEVICE_MARGIN`` to spare (never on the CPU,
    whose choice between memory and streaming ``TrainingData.open`` makes)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(cache, dtype, guides) <= free - DEVICE_MARGIN


def upload(read: Callable[[np.ndarray], np.ndarray], count: int, device: torch.device,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows 0…count−1 of ``read(indices)`` in one tensor on ``device`` (as ``dtype``; None: as read), filled
    a chunk at a time so that the host never holds more than a chunk."""
    first = torch.from_numpy(read(np.arange(min(1, count))))
    rows = max(1, CHUNK_BYTES // max(1, first[0].numel() * first.element_size())) if count else 1
    whole = torch.empty((count, *first.shape[1:]), dtype=dtype or first.dtype, device=device)
    for start in range(0, count, rows):
        whole[start:start + rows].copy_(torch.from_numpy(read(np.arange(start, min(count, start + rows)))))
    return whole


class ResidentViews(dict):
    """Every image's features of a view (N×h×w×C on ``device``), uploaded when first asked for: a run that
    does not train on the other views never reads them."""

    def __init__(self, cache: FeatureCache, device: torch.device, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.cache, self.device, self.dtype = cache, device, dtype
        self.uploading = threading.Lock()  # a sweep's concurrent jobs ask for a view once between them

    def __missing__(self, view: str) -> torch.Tensor:
        with self.uploading:
            if view not in self:
                self[view] = upload(lambda rows: self.cache.features(rows, view), len(self.cache), self.device,
                                    self.dtype)
        return self[view]
