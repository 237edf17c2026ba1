"""The cache held whole where training computes: on the GPU when it fits there, else in host memory.

Every image's features (per view, in the dtype the caller computes with; by default as stored), masks
(uint8) and, for decoders that see the image, previews are copied chunk by chunk from the HDF5 file into
tensors allocated once on the target device: no full host copy on the way, so a machine with little host
RAM (Colab's 12 GB) can hold on its GPU a cache it could not hold in memory. Batches are then gathered
by index on that device. On the CPU the tensors are exactly those a whole read would give.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Mapping, Sequence

import h5py
import numpy as np
import torch

from fishseg.config import IDENTITY
from fishseg.formats.cache import FeatureCache, feature_name

__all__ = ["DEVICE_MARGIN", "HeldSource", "ResidentViews", "fits_on_device", "resident_bytes", "upload"]

DEVICE_MARGIN = 2 << 30  # bytes kept free on a GPU for the decoder, its activations, the optimizer and the allocator
CHUNK_BYTES = 64 << 20  # of HDF5 data read (and copied) at a time


def resident_bytes(cache: FeatureCache, dtype: torch.dtype | None, guides: bool) -> int:
    """Bytes the whole cache takes held in ``dtype`` (None: as stored), every view included, with its masks
    and (``guides``) previews."""
    return cache.bytes_per_image(previews=guides, feature_itemsize=None if dtype is None else dtype.itemsize) \
        * len(cache)


def fits_on_device(cache: FeatureCache, device: torch.device, dtype: torch.dtype | None, guides: bool) -> bool:
    """Whether the cache fits in the GPU's free memory with ``DEVICE_MARGIN`` to spare (never on the CPU,
    whose choice between memory and streaming ``TrainingData.open`` makes)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(cache, dtype, guides) <= free - DEVICE_MARGIN


def upload(read: Callable[[np.ndarray], np.ndarray], stored: h5py.Dataset, device: torch.device,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """All rows of ``read(indices)``, shaped like the HDF5 dataset ``stored``, in one tensor on ``device`` (as
    ``dtype``; None: as stored), filled a chunk at a time so that the host never holds more than a chunk."""
    count, row_bytes = stored.shape[0], int(np.prod(stored.shape[1:])) * stored.dtype.itemsize
    rows = max(1, CHUNK_BYTES // max(1, row_bytes))
    whole = torch.empty(stored.shape, dtype=dtype or torch.from_numpy(np.empty(0, stored.dtype)).dtype, device=device)
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
                self[view] = upload(lambda rows: self.cache.features(rows, view), self.cache.file[feature_name(view)],
                                    self.device, self.dtype)
        return self[view]


@dataclasses.dataclass(frozen=True)
class HeldSource:
    """The held tensors read the way scoring reads a cache (``evaluate.ScoringSource``), so that a sweep
    scores each config from them instead of reading the HDF5 file again."""

    cache: FeatureCache
    views: Mapping[str, torch.Tensor]  # per view, as TrainingData holds them
    held_masks: torch.Tensor
    held_previews: torch.Tensor | None

    def _rows(self, indices: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(indices, device=self.held_masks.device)

    def features(self, indices: np.ndarray, *, layers: Sequence[int] | None = None) -> torch.Tensor:
        grid = self.views[IDENTITY][self._rows(indices)]
        channels = self.cache.channels(layers)
        return grid if channels is None else grid[..., torch.from_numpy(channels).to(grid.device)]

    def masks(self, indices: np.ndarray) -> torch.Tensor:
        return self.held_masks[self._rows(indices)]

    def previews(self, indices: np.ndarray) -> np.ndarray | torch.Tensor:
        return (self.cache.previews(indices) if self.held_previews is None
                else self.held_previews[self._rows(indices)])
