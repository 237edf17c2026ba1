"""The pixel classes of a cache and of the runs trained on it: binary (fish or not) or several classes.

Binary is fishseg's original problem and stays exactly as it was: one logit per pixel, a sigmoid, a
threshold. With several classes (``extract --classes``) a decoder gives one logit per class and a pixel's
class is the arg max. Class 0 is always the background; a mask pixel's value is its class index.
"""

from __future__ import annotations

import colorsys
import dataclasses

import torch

BACKGROUND = "background"
BINARY_NAMES = (BACKGROUND, "fish")
BACKGROUND_COLOUR = (0, 0, 0)

Colour = tuple[int, int, int]


def default_colours(count: int) -> tuple[Colour, ...]:
    """Black for the background, then ``count - 1`` hues spread around the colour wheel (golden-ratio steps, so
    neighbouring indices differ clearly), bright enough to read on a photo."""
    hues = ((0.13 + k * 0.618034) % 1.0 for k in range(count - 1))
    return (BACKGROUND_COLOUR, *(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95)) for hue in hues))


@dataclasses.dataclass(frozen=True)
class Classes:
    """What a mask value means: ``names[k]`` is class k (``names[0]`` the background) and ``colours[k]`` its
    colour in label PNGs, overlays and legends. ``binary``: one output channel (sigmoid), as fishseg always did."""

    names: tuple[str, ...] = BINARY_NAMES
    colours: tuple[Colour, ...] = ()  # () = default_colours
    binary: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        colours = tuple(tuple(int(v) for v in colour) for colour in self.colours) or default_colours(len(self.names))
        object.__setattr__(self, "colours", colours)
        if self.binary and len(self.names) != 2:
            raise ValueError(f"binary classes are two (background and foreground), not {len(self.names)}")
        if len(colours) != len(self.names):
            raise ValueError(f"{len(self.names)} classes but {len(colours)} colours")

    @classmethod
    def several(cls, names: tuple[str, ...], colours: tuple[Colour, ...] = ()) -> Classes:
        """Classes read from a class list (``extract --classes``): one output channel each."""
        return cls(tuple(names), tuple(colours), binary=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def channels(self) -> int:
        """Decoder output channels: 1 for binary (a logit of foreground), one per class otherwise."""
        return 1 if self.binary else len(self.names)

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits as ``segment`` returns them (binary B×S×S, several classes B×C×S×S) → class indices B×S×S
        (int64): binary at probability 0.5 (logit > 0), several classes by arg max."""
        return (logits > 0).long() if self.binary else logits.argmax(1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities B×C×S×S (C = len(self), summing to 1 over C) from ``segment``'s logits."""
        if self.binary:
            foreground = torch.sigmoid(logits.float())[:, None]
            return torch.cat([1 - foreground, foreground], 1)
        return torch.softmax(logits.float(), 1)

    def describe(self) -> str:
        """One line for logs and reports: "binary (background, fish)" or "3 classes: background, cod, reef"."""
        if self.binary:
            return f"binary ({', '.join(self.names)})"
        return f"{len(self.names)} classes: {', '.join(self.names)}"
