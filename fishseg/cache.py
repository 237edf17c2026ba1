"""The HDF5 feature cache: the one place that knows its layout.

Datasets (N images, grid h×w, feature dim D, image size S, preview size P):

* ``features``    N×h×w×D float16, one chunk per image, optionally lzf or gzip compressed
* ``masks``       N×S×S uint8 in {0, 1}, one chunk per image, lzf-compressed
* ``previews``    N×P×P×3 uint8 RGB, one chunk per image, lzf-compressed
* ``image_ids``   N utf-8 strings: image paths relative to the data root
* ``class_names`` C utf-8 strings; ``class_index`` N int16 indices into them

Attributes: ``format_version``, ``fishseg_version``, ``created_at``, ``fingerprint``,
``extract_config`` and ``backbone`` (JSON), and for people reading the file with h5dump:
``backbone_id``, ``random_init``, ``image_size``, ``patch_size``, ``feature_dim``, ``grid_size``,
``normalisation``. A cache is written to ``<name>.partial`` and renamed when complete, so a file
at the final path is always whole.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Sequence

import h5py
import numpy as np

from fishseg import __version__
from fishseg.config import (COMPRESSIONS, DEFAULT_COMPRESSION, BackboneInfo, ExtractConfig, fingerprint, from_json,
                            to_json)
from fishseg.data import Sample
from fishseg.errors import FishsegError

FORMAT_VERSION = 1
STRING = h5py.string_dtype("utf-8")


def cache_fingerprint(config: ExtractConfig, backbone: BackboneInfo, image_ids: Sequence[str]) -> str:
    """Identifies a cache's content: same config, backbone and images give the same fingerprint."""
    return fingerprint(to_json(config), to_json(backbone), image_ids)


class CacheWriter:
    """Context manager writing a new cache batch by batch; renamed into place only on success."""

    def __init__(self, path: Path, config: ExtractConfig, backbone: BackboneInfo, samples: Sequence[Sample],
                 compression: str = DEFAULT_COMPRESSION) -> None:
        if compression not in COMPRESSIONS:
            raise FishsegError(f"unknown compression '{compression}'; choose one of {', '.join(COMPRESSIONS)}")
        self.compression = None if compression == "none" else compression
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.config = config
        self.backbone = backbone
        self.samples = samples
        self.file: h5py.File | None = None

    def __enter__(self) -> CacheWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.partial, "w")
        self._create_layout(self.file)
        return self

    def _create_layout(self, file: h5py.File) -> None:
        n, size, preview = len(self.samples), self.config.image_size, self.config.preview_size
        grid, dim = size // self.backbone.patch_size, self.backbone.feature_dim
        file.create_dataset("features", (n, grid, grid, dim), np.float16, chunks=(1, grid, grid, dim),
                            compression=self.compression)
        file.create_dataset("masks", (n, size, size), np.uint8, chunks=(1, size, size), compression="lzf")
        file.create_dataset("previews", (n, preview, preview, 3), np.uint8, chunks=(1, preview, preview, 3),
                            compression="lzf")
        image_ids = [sample.image_id for sample in self.samples]
        class_names = sorted({sample.class_name for sample in self.samples})
        file.create_dataset("image_ids", data=image_ids, dtype=STRING)
        file.create_dataset("class_names", data=class_names, dtype=STRING)
        file.create_dataset("class_index", dtype=np.int16,
                            data=[class_names.index(sample.class_name) for sample in self.samples])
        file.attrs.update({
            "format_version": FORMAT_VERSION,
            "fishseg_version": __version__,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": cache_fingerprint(self.config, self.backbone, image_ids),
            "extract_config": to_json(self.config),
            "backbone": to_json(self.backbone),
            "backbone_id": self.backbone.name,
            "random_init": self.backbone.random_init,
            "image_size": size,
            "patch_size": self.backbone.patch_size,
            "feature_dim": dim,
            "grid_size": grid,
            "normalisation": json.dumps({"mean": self.config.mean, "std": self.config.std}),
        })

    def write(self, start: int, features: np.ndarray, masks: np.ndarray, previews: np.ndarray) -> None:
        """Store images ``start … start+B-1``: features B×h×w×D, masks B×S×S, previews B×P×P×3."""
        stop = start + len(features)
        self.file["features"][start:stop] = features
        self.file["masks"][start:stop] = masks
        self.file["previews"][start:stop] = previews

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


class FeatureCache:
    """A finished cache opened for reading; attributes are validated on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = _open_checked(path)
        attrs = self.file.attrs
        self.fingerprint: str = str(attrs["fingerprint"])
        self.config = from_json(ExtractConfig, attrs["extract_config"])
        self.backbone = from_json(BackboneInfo, attrs["backbone"])
        self.created_at: str = str(attrs["created_at"])
        self.image_ids: list[str] = list(self.file["image_ids"].asstr()[:])
        self.class_names: list[str] = list(self.file["class_names"].asstr()[:])
        self.class_index: np.ndarray = self.file["class_index"][:].astype(np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()

    def bytes_per_image(self) -> int:
        """Uncompressed bytes of one image's features and mask, as training holds them."""
        return sum(int(np.prod(self.file[name].shape[1:])) * self.file[name].dtype.itemsize
                   for name in ("features", "masks"))

    def features(self, indices: Sequence[int]) -> np.ndarray:
        """float16 B×h×w×D for the given image indices, in the given order."""
        return _take(self.file["features"], indices)

    def masks(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 B×S×S in {0, 1}."""
        return _take(self.file["masks"], indices)

    def previews(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 B×P×P×3 RGB."""
        return _take(self.file["previews"], indices)

    def indices_of(self, image_ids: Sequence[str], source: Path) -> np.ndarray:
        """Cache indices of ``image_ids``; an id missing from the cache is an error naming ``source``."""
        position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        missing = [image_id for image_id in image_ids if image_id not in position]
        if missing:
            raise FishsegError(f"{source}: {len(missing)} images are not in cache {self.path}, e.g. {missing[0]}")
        return np.array([position[image_id] for image_id in image_ids], dtype=np.int64)

    def require(self, expected_fingerprint: str, source: Path) -> None:
        """Refuse to pair this cache with an artifact (a run) made from another cache."""
        if expected_fingerprint != self.fingerprint:
            raise FishsegError(
                f"{source}: made from cache {expected_fingerprint} but {self.path} is cache "
                f"{self.fingerprint}; pass the cache it was trained on"
            )


def _open_checked(path: Path) -> h5py.File:
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = " (an extraction into it was interrupted; run extract again)" if partial.exists() else ""
        raise FishsegError(f"{path}: cache not found{hint}")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise FishsegError(f"{path}: not a readable HDF5 file ({error}); extract the cache again") from None
    version = file.attrs.get("format_version")
    if version is None:
        file.close()
        raise FishsegError(f"{path}: HDF5 file is not a fishseg cache (no format_version attribute)")
    if int(version) != FORMAT_VERSION:
        file.close()
        raise FishsegError(
            f"{path}: cache format v{int(version)}, this fishseg {__version__} reads v{FORMAT_VERSION}; "
            f"extract the cache again"
        )
    return file


def _take(dataset: h5py.Dataset, indices: Sequence[int]) -> np.ndarray:
    """Rows ``indices`` in the given order, read one chunk at a time in file order.

    Per-row ``read_direct`` is ~90× faster than h5py's fancy indexing for a batch of 8 images
    (measured: 1.7 ms against 152 ms), and it fills the output without an intermediate copy.
    """
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), *dataset.shape[1:]), dataset.dtype)
    for position in np.argsort(indices, kind="stable"):
        dataset.read_direct(out, np.s_[int(indices[position])], np.s_[int(position)])
    return out
