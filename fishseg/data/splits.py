"""Train/validation splits: near-duplicate groups, grouped and random folds, and the split a config asks for.

A grouped split keeps every near-duplicate group (or every group a name pattern gives) on one side, so
validation never scores an image whose twin was trained on; folds are stratified by class where the
groups allow: the image's class (species folder) for binary masks, with pixel classes the image's dominant one.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Protocol, Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from PIL import Image
from sklearn.model_selection import KFold, StratifiedGroupKFold

from fishseg.classes import Classes
from fishseg.config import TrainConfig, shown
from fishseg.errors import FishsegError
from fishseg.runtime import plural

DUPLICATE_SIDE = 16  # thumbnail side for near-duplicate search
DUPLICATE_THRESHOLD = 0.9  # cosine similarity of normalised thumbnails that makes two images near-duplicates


def thumbnails(previews: np.ndarray, side: int = DUPLICATE_SIDE) -> np.ndarray:
    """N×P×P×3 RGB → N×side×side grayscale, each zero-mean and unit-norm (brightness and contrast drop out)."""
    small = np.stack([np.asarray(Image.fromarray(p).convert("L").resize((side, side), Image.Resampling.BOX),
                                 dtype=np.float32) for p in previews])
    small -= small.mean(axis=(1, 2), keepdims=True)
    return small / np.maximum(np.linalg.norm(small, axis=(1, 2), keepdims=True), 1e-6)


def _dihedral(thumbs: np.ndarray) -> np.ndarray:
    """N×s×s → N×8×s² : the 4 rotations of each thumbnail and of its mirror image."""
    views = [np.rot90(t, k, axes=(1, 2)) for t in (thumbs, thumbs[:, :, ::-1]) for k in range(4)]
    return np.stack(views, axis=1).reshape(len(thumbs), 8, -1)


def near_duplicate_groups(thumbs: np.ndarray, threshold: float = DUPLICATE_THRESHOLD, chunk: int = 512) -> np.ndarray:
    """Group ids (N) linking images that are flips, 90° rotations, small crops or colour changes of each other.

    ``thumbs`` come from ``thumbnails`` of the cached previews, so no image is decoded again. Two
    images are linked when the cosine similarity of their thumbnails, under the best of the 8
    flips/rotations, reaches ``threshold``; groups are the connected components.
    """
    flat, views = thumbs.reshape(len(thumbs), -1), _dihedral(thumbs).reshape(len(thumbs) * 8, -1)
    rows, cols = [], []
    for start in range(0, len(flat), chunk):
        similarity = (flat[start:start + chunk] @ views.T).reshape(-1, len(flat), 8).max(axis=2)
        linked = np.argwhere(similarity >= threshold)
        rows.append(linked[:, 0] + start)
        cols.append(linked[:, 1])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = scipy.sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(flat),) * 2)
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def groups_from_names(image_ids: list[str], pattern: str) -> np.ndarray:
    """Group ids from the first match of the regular expression ``pattern`` in each image id."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise FishsegError(f"`group_pattern={shown(pattern)}`: not a regular expression ({error})") from None
    keys = []
    for image_id in image_ids:
        found = compiled.search(image_id)
        if found is None:
            raise FishsegError(f"`group_pattern={shown(pattern)}`: no match in image id {image_id}")
        keys.append(found.group(0))
    return np.unique(keys, return_inverse=True)[1]


def duplicates_across(train_idx: np.ndarray, val_idx: np.ndarray, groups: np.ndarray) -> int:
    """How many validation images share a group with a training image."""
    return int(np.isin(groups[val_idx], groups[train_idx]).sum())


Folds = list[tuple[np.ndarray, np.ndarray]]  # (train indices, val indices) per fold


def grouped_folds(groups: np.ndarray, classes: np.ndarray, n_folds: int, seed: int) -> Folds:
    """K folds that never split a group, stratified by class where the groups allow (StratifiedGroupKFold).
    ``classes``: each image's class name (or index)."""
    require_grouped_folds(groups, classes, n_folds)
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than K is left out of some folds: "where the groups allow"
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return [(np.sort(train), np.sort(val)) for train, val in folds.split(np.zeros(len(groups)), classes, groups)]


def require_grouped_folds(groups: np.ndarray, classes: np.ndarray, n_folds: int,
                          val_fraction: float | None = None) -> None:
    """Refuse, in one line, grouped folds that cannot be made: fewer groups than folds, or no class with as many
    images as folds (StratifiedGroupKFold's limit). ``val_fraction``: the folds are those of a train/val split.
    Cheap, so that a split is checked before anything is written."""
    asked = (f"a grouped split of `val_fraction={shown(val_fraction)}` ({n_folds} folds)" if val_fraction
             else f"{n_folds} grouped folds")
    n_groups = len(np.unique(groups))
    labels, counts = np.unique(classes, return_counts=True)
    largest = int(counts.max())
    remedy = _fewer_folds(min(n_groups, largest), val_fraction)
    if n_groups < n_folds:
        raise FishsegError(f"{plural(n_groups, 'group')} of near-duplicates are too few for {asked}; {remedy}")
    if largest < n_folds:
        raise FishsegError(f"too few images per class for {asked}: no class has {n_folds} (the largest, "
                           f"{labels[counts.argmax()]}, has {largest}); {remedy}")


def _fewer_folds(most: int, val_fraction: float | None) -> str:
    """What to do when at most ``most`` folds can be made: the ``folds`` or ``val_fraction`` that makes that many."""
    if most < 2:
        return "use `split='random'`, or add images"
    fewer = f"`val_fraction={math.ceil(100 / most) / 100:g}` or more" if val_fraction else f"`folds={most}` or fewer"
    return f"use {fewer}, `split='random'`, or add images"


def random_folds(n_images: int, n_folds: int, seed: int) -> Folds:
    if n_images < n_folds:
        raise FishsegError(f"{plural(n_images, 'image')}: too few for {n_folds} folds; use `folds={n_images}` or "
                           f"fewer, or add images")
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(val)) for train, val in folds.split(np.zeros(n_images))]


def split_folds(val_fraction: float) -> int:
    """The number of folds whose first is a train/val split of about ``val_fraction`` validation."""
    if not 0.0 < val_fraction < 1.0:
        raise FishsegError(f"`val_fraction={shown(val_fraction)}`: must be between 0 and 1")
    return max(2, round(1 / val_fraction))


def grouped_split(groups: np.ndarray, classes: np.ndarray, val_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A train/val split by groups, about ``val_fraction`` validation: the first of ``split_folds`` folds."""
    n_folds = split_folds(val_fraction)
    require_grouped_folds(groups, classes, n_folds, val_fraction)
    return grouped_folds(groups, classes, n_folds, seed)[0]


def random_split(n_images: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random train/val split of ``range(n_images)``; both parts sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise FishsegError(f"`val_fraction={shown(val_fraction)}`: must be between 0 and 1")
    n_val = max(1, round(n_images * val_fraction))
    if n_val >= n_images:
        raise FishsegError(f"{plural(n_images, 'image')}: too few for a train/val split; add images")
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class Labelled(Protocol):
    """What a split reads of a dataset (a ``FeatureCache`` is one): image ids, near-duplicate groups, classes, and
    with pixel classes each image's pixels per class (N×C; None where they were not counted)."""

    image_ids: Sequence[str]
    groups: np.ndarray
    class_names: Sequence[str]
    class_index: np.ndarray
    classes: Classes
    image_class_pixels: np.ndarray | None

    def __len__(self) -> int: ...


def split_indices(cache: Labelled, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train and val indices for ``config`` (split method, fold), and the groups they respect or leak."""
    groups = _split_groups(cache, config)
    if config.split == "grouped":
        n_folds = config.folds or split_folds(config.val_fraction)
        classes = _strata(cache, n_folds)
        if config.folds:
            return (*grouped_folds(groups, classes, config.folds, config.seed)[config.fold], groups)
        return (*grouped_split(groups, classes, config.val_fraction, config.seed), groups)
    if config.folds:
        return (*random_folds(len(cache), config.folds, config.seed)[config.fold], groups)
    return (*random_split(len(cache), config.val_fraction, config.seed), groups)


def check_split(cache: Labelled, config: TrainConfig) -> None:
    """Refuse what ``split_indices`` would refuse, before anything is written, without making a grouped split
    (seconds on a large cache)."""
    if config.split != "grouped":
        split_indices(cache, config)
        return
    val_fraction = None if config.folds else config.val_fraction  # folds of a --cv, or of one train/val split
    n_folds = config.folds or split_folds(config.val_fraction)
    require_grouped_folds(_split_groups(cache, config), _strata(cache, n_folds), n_folds, val_fraction)


def _split_groups(cache: Labelled, config: TrainConfig) -> np.ndarray:
    return groups_from_names(cache.image_ids, config.group_pattern) if config.group_pattern else cache.groups


def dominant_classes(image_class_pixels: np.ndarray) -> np.ndarray:
    """Each image's dominant pixel class (N class indices) from its pixels per class (N×C): the class other than
    the background with the most pixels in its mask (the lowest index on a tie), 0 for an image of background
    only."""
    foreground = np.asarray(image_class_pixels)[:, 1:]
    return np.where(foreground.max(1) > 0, foreground.argmax(1) + 1, 0)


def _strata(cache: Labelled, n_folds: int) -> np.ndarray:
    """What a grouped split into ``n_folds`` stratifies by, and its messages name, per image: with pixel classes
    the dominant class's name, where some class dominates at least ``n_folds`` images; else (and for binary
    masks, or pixels not counted) the image's class (its species folder)."""
    folders = np.asarray(cache.class_names)[cache.class_index]
    if cache.classes.binary or cache.image_class_pixels is None:
        return folders
    dominant = np.asarray(cache.classes.names)[dominant_classes(cache.image_class_pixels)]
    return dominant if np.unique(dominant, return_counts=True)[1].max() >= n_folds else folders
