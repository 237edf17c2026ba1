"""Generated fish photos for the demo, the benchmarks and the tests.

The generator writes a small dataset in the Kaggle layout: fish-like shapes (body, forked tail,
eye, dorsal shading, some striped) of varied colour, size and rotation, each casting a shadow on a
textured tray. Masks are computed analytically from the same shape, so they are exact. For several pixel
classes it writes photos of two or more fish of different species each, with class-index masks and their
class list (``write_multispecies_dataset``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from fishseg.classes import BACKGROUND

KAGGLE_SIZE = (590, 445)  # width, height of the Kaggle fish photos
DATA_NOTE = "Synthetic fish written by fishseg's demo generator.\n"  # README.txt of the data: marks a demo folder


@dataclasses.dataclass(frozen=True)
class Species:
    name: str  # folder name, kept verbatim like Kaggle's (spaces, the "Hourse" misspelling)
    colour: tuple[int, int, int]
    aspect: float  # body length / body height
    stripes: bool


SPECIES = (
    Species("Black Sea Sprat", (70, 95, 135), 4.5, False),
    Species("Hourse Mackerel", (150, 160, 155), 3.6, True),
    Species("Red Mullet", (205, 95, 80), 3.2, False),
    Species("Gilt-Head Bream", (175, 170, 130), 2.2, True),
)


def _tray(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Float H×W×3 tray: a light base colour, low-frequency blotches and fine grain."""
    base = rng.uniform(150, 230, size=3)
    blotches = Image.fromarray(rng.uniform(0, 255, (6, 8)).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    blotches = (np.asarray(blotches, dtype=np.float64)[..., None] - 128) * 0.25
    return base + blotches + rng.normal(0, 6, (height, width, 3))


def _fish_shape(u: np.ndarray, v: np.ndarray, half_length: float, half_height: float) -> np.ndarray:
    """Boolean fish in local coordinates (u along the body, head at +u): body ellipse plus tail."""
    body = (u / half_length) ** 2 + (v / (half_height * (1 + 0.2 * u / half_length))) ** 2 <= 1
    tail_u = -u - 0.85 * half_length  # distance behind the tail root
    tail = (tail_u >= 0) & (tail_u <= 0.5 * half_length) & (np.abs(v) <= 1.8 * half_height * tail_u / half_length)
    return body | tail


@dataclasses.dataclass(frozen=True)
class _Pose:
    """Where a fish lies in a photo, in pixels."""

    half_length: float
    half_height: float
    angle: float  # of the body axis, radians
    centre: tuple[float, float]  # x, y


def _pose(rng: np.random.Generator, species: Species, size: tuple[int, int], *, scale: float = 1.0,
          across: tuple[float, float] = (0.35, 0.65)) -> _Pose:
    """A random pose: ``scale`` shrinks the fish (several share a photo), ``across`` bounds its centre's x as a
    fraction of the width (its y lies in the middle 30%)."""
    width, height = size
    half_length = rng.uniform(0.22, 0.34) * width * scale
    half_height = half_length / species.aspect * rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, 2 * np.pi)
    centre = rng.uniform((across[0], 0.35), (across[1], 0.65), size=2) * (width, height)
    return _Pose(half_length, half_height, angle, (float(centre[0]), float(centre[1])))


def _fish_layer(rng: np.random.Generator, species: Species, pose: _Pose, xs: np.ndarray,
                ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fish on pixel grids ``xs``, ``ys`` (H×W): its skin (float H×W×3), body and shadow (bool H×W)."""
    height, width = xs.shape
    half_length, half_height, angle = pose.half_length, pose.half_height, pose.angle

    def local(dx: float, dy: float) -> tuple[np.ndarray, np.ndarray]:
        x, y = xs - pose.centre[0] - dx, ys - pose.centre[1] - dy
        return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)

    u, v = local(0, 0)
    body = _fish_shape(u, v, half_length, half_height)
    shadow = _fish_shape(*local(0.03 * width, 0.04 * height), half_length, half_height) & ~body
    colour = np.asarray(species.colour) * rng.uniform(0.8, 1.2, size=3)
    skin = colour * (1 - 0.35 * np.clip(v / half_height, -1, 1))[..., None]
    if species.stripes:
        skin *= np.where(np.sin(u / half_height * 3) > 0.6, 0.75, 1.0)[..., None]
    eye = (u - 0.7 * half_length) ** 2 + (v + 0.2 * half_height) ** 2 <= (0.12 * half_height) ** 2
    skin[eye] = 20
    return skin, body, shadow


def _photo(rng: np.random.Generator, size: tuple[int, int],
           fish: Sequence[tuple[Species, _Pose]]) -> tuple[np.ndarray, np.ndarray]:
    """A tray with ``fish`` laid on it in order, each over the ones before (its shadow too): the H×W×3 uint8
    photo and which fish each pixel shows (H×W int64: k for the k-th fish, 0 for the tray). Exact, as the
    shapes are."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    layers = [_fish_layer(rng, species, pose, xs, ys) for species, pose in fish]
    photo = _tray(rng, width, height)
    shows = np.zeros((height, width), np.int64)
    for number, (skin, body, shadow) in enumerate(layers, 1):
        photo[shadow] *= 0.7
        photo[body] = skin[body] + rng.normal(0, 8, (int(body.sum()), 3))
        shows[body] = number
    return np.clip(photo, 0, 255).astype(np.uint8), shows


def draw_fish_image(rng: np.random.Generator, species: Species,
                    size: tuple[int, int] = KAGGLE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One H×W×3 uint8 photo and its exact H×W bool mask."""
    photo, shows = _photo(rng, size, [(species, _pose(rng, species, size))])
    return photo, shows > 0


def draw_multispecies_image(rng: np.random.Generator, species: Sequence[Species], count: int,
                            size: tuple[int, int] = KAGGLE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One H×W×3 uint8 photo of ``count`` (>= 2) fish side by side, at least two of them of different
    ``species``, and its exact H×W uint8 mask of class indices (fish of ``species[k]``: class k + 1)."""
    kinds = rng.permutation(len(species))[:count]  # different species first, then any
    kinds = np.concatenate([kinds, rng.integers(0, len(species), count - len(kinds))])
    poses = [_pose(rng, species[kind], size, scale=1.2 / count, across=((slot + 0.3) / count, (slot + 0.7) / count))
             for slot, kind in enumerate(kinds)]
    photo, shows = _photo(rng, size, [(species[kind], pose) for kind, pose in zip(kinds, poses)])
    return photo, np.concatenate([[0], kinds + 1]).astype(np.uint8)[shows]


def write_demo_dataset(root: Path, *, classes: int = 3, images_per_class: int = 12, seed: int = 0,
                       size: tuple[int, int] = KAGGLE_SIZE) -> Path:
    """Write ``Fish_Dataset/Fish_Dataset/<Class>/<Class>/NNNNN.png`` and ``<Class> GT/`` masks; returns ``root``."""
    rng = np.random.default_rng(seed)
    dataset = root / "Fish_Dataset" / "Fish_Dataset"
    for species in SPECIES[:classes]:
        image_dir = dataset / species.name / species.name
        mask_dir = dataset / species.name / f"{species.name} GT"
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for number in range(1, images_per_class + 1):
            photo, fish = draw_fish_image(rng, species, size)
            Image.fromarray(photo).save(image_dir / f"{number:05d}.png")
            Image.fromarray(fish.astype(np.uint8) * 255).save(mask_dir / f"{number:05d}.png")
    (dataset / "README.txt").write_text(DATA_NOTE)
    return root


def generated_dataset(root: Path) -> Path:
    """The folder ``write_demo_dataset(root)`` writes whole (the Kaggle layout's ``Fish_Dataset``)."""
    return root / "Fish_Dataset"


def write_multispecies_dataset(root: Path, *, images: int = 12, species: int = 3,
                               fish_per_image: tuple[int, int] = (2, 3), seed: int = 0,
                               size: tuple[int, int] = KAGGLE_SIZE) -> Path:
    """Write photos of several fish of the first ``species`` of SPECIES (2 or more of different species each, as
    many as ``fish_per_image`` allows, both ends included) in the generic layout: ``images/NNNNN.png``,
    ``masks/NNNNN.png`` (8-bit class indices, 0 the tray) and ``classes.json`` (the background, then the species:
    ``extract --classes root/classes.json``); returns ``root``. The same seed writes the same files."""
    fewest, most = fish_per_image
    if not 2 <= species <= len(SPECIES) or not 2 <= fewest <= most:
        raise ValueError(f"species {species} (2 … {len(SPECIES)}) and fish_per_image {fish_per_image} (2 or more, "
                         f"fewest first): several species to a photo")
    rng = np.random.default_rng(seed)
    kinds = SPECIES[:species]
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for number in range(1, images + 1):
        photo, labels = draw_multispecies_image(rng, kinds, int(rng.integers(fewest, most + 1)), size)
        Image.fromarray(photo).save(root / "images" / f"{number:05d}.png")
        Image.fromarray(labels, mode="L").save(root / "masks" / f"{number:05d}.png")
    (root / "classes.json").write_text(json.dumps([BACKGROUND, *(kind.name for kind in kinds)]) + "\n")
    return root
