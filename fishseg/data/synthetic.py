"""Generated fish photos for the demo, the benchmarks and the tests.

The generator writes a small dataset in the Kaggle layout: fish-like shapes (body, forked tail,
eye, dorsal shading, some striped) of varied colour, size and rotation, each casting a shadow on a
textured tray. Masks are computed analytically from the same shape, so they are exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

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


def draw_fish_image(rng: np.random.Generator, species: Species,
                    size: tuple[int, int] = KAGGLE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One H×W×3 uint8 photo and its exact H×W bool mask."""
    width, height = size
    half_length = rng.uniform(0.22, 0.34) * width
    half_height = half_length / species.aspect * rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, 2 * np.pi)
    centre = rng.uniform(0.35, 0.65, size=2) * (width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)

    def local(dx: float, dy: float) -> tuple[np.ndarray, np.ndarray]:
        x, y = xs - centre[0] - dx, ys - centre[1] - dy
        return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)

    u, v = local(0, 0)
    fish = _fish_shape(u, v, half_length, half_height)
    shadow = _fish_shape(*local(0.03 * width, 0.04 * height), half_length, half_height) & ~fish
    colour = np.asarray(species.colour) * rng.uniform(0.8, 1.2, size=3)
    skin = colour * (1 - 0.35 * np.clip(v / half_height, -1, 1))[..., None]
    if species.stripes:
        skin *= np.where(np.sin(u / half_height * 3) > 0.6, 0.75, 1.0)[..., None]
    eye = (u - 0.7 * half_length) ** 2 + (v + 0.2 * half_height) ** 2 <= (0.12 * half_height) ** 2
    skin[eye] = 20
    photo = _tray(rng, width, height)
    photo[shadow] *= 0.7
    photo[fish] = skin[fish] + rng.normal(0, 8, (int(fish.sum()), 3))
    return np.clip(photo, 0, 255).astype(np.uint8), fish


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
