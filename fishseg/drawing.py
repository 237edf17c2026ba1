"""Masks and class maps drawn on photos: label PNGs, tinted overlays and their legend.

One place for the colours a prediction is drawn in, imported by ``predict`` and the Segmenter (and by the report
for its galleries); it needs only numpy, Pillow and the pixel classes, so inference never imports evaluation or
training to draw. Everything here works on PIL images and H×W numpy arrays at any size.

- ``label_image``: H×W class indices → a palette PNG image (mode "P"): each pixel's value is its class index and the
  palette holds the class colours, so a viewer shows the colours and a reader gets the indices back.
- ``tint`` (binary: one colour over the fish) and ``tint_classes`` (each class in its colour, the background left
  as it is) blend in place, Pillow doing the blend (no full-size float copy of a large photo).
- ``with_legend``: the image with a strip on its right naming each class beside a swatch of its colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fishseg.classes import Classes

__all__ = ["LEGEND_BACKGROUND", "OVERLAY_ALPHA", "OVERLAY_COLOUR", "label_image", "legend", "overlay", "tint",
           "tint_classes", "with_legend"]

OVERLAY_COLOUR, OVERLAY_ALPHA = (46, 204, 64), 0.45  # binary overlays: the fish in green, 45% over the photo
LEGEND_BACKGROUND, LEGEND_TEXT = (255, 255, 255), (0, 0, 0)
LEGEND_FONT_PX = (12, 96)  # the legend's font: a 30th of the image's height, within these bounds


def _alpha(mask: np.ndarray) -> Image.Image:
    """H×W bool → the paste mask that blends a colour in at OVERLAY_ALPHA where ``mask`` is set."""
    return Image.fromarray(mask * np.uint8(round(OVERLAY_ALPHA * 255)))


def tint(photo: Image.Image, mask: np.ndarray) -> Image.Image:
    """Tint the fish (H×W bool ``mask``) on the RGB ``photo`` in place, in OVERLAY_COLOUR."""
    photo.paste(OVERLAY_COLOUR, mask=_alpha(mask))
    return photo


def label_image(labels: np.ndarray, classes: Classes) -> Image.Image:
    """H×W class indices (uint8, each < len(classes)) → a mode "P" image of those values whose palette holds
    ``classes.colours`` (entry k = class k), as predict writes masks/NAME.png for several classes."""
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"expected H×W uint8 class indices, got {labels.dtype} {labels.shape}")
    image = Image.fromarray(labels)
    image.putpalette([value for colour in classes.colours for value in colour])  # "L" becomes "P", values kept
    return image


def tint_classes(photo: Image.Image, labels: np.ndarray, classes: Classes) -> Image.Image:
    """Blend each class's colour over its pixels (H×W ``labels``) on the RGB ``photo`` in place, at OVERLAY_ALPHA;
    the background (class 0) is left as it is."""
    photo.paste(label_image(labels, classes).convert("RGB"), mask=_alpha(labels > 0))
    return photo


def legend(classes: Classes, height: int) -> Image.Image:
    """A white RGB strip ``height`` pixels high naming every class but the background beside a swatch of its
    colour, one under another, in as many columns as the height needs."""
    size = int(np.clip(height // 30, *LEGEND_FONT_PX))
    font = ImageFont.load_default(size=size)
    line, pad = round(size * 1.5), size // 2
    entries = list(zip(classes.names, classes.colours))[1:]
    rows = max(1, (height - pad) // line)
    columns = [entries[start:start + rows] for start in range(0, len(entries), rows)]
    widths = [size + pad + max(round(font.getlength(name)) for name, _ in column) + 2 * pad for column in columns]
    strip = Image.new("RGB", (pad + sum(widths), height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    left = pad
    for column, width in zip(columns, widths):
        for row, (name, colour) in enumerate(column):
            top = pad + row * line
            draw.rectangle((left, top, left + size - 1, top + size - 1), fill=colour, outline=LEGEND_TEXT)
            draw.text((left + size + pad, top), name, fill=LEGEND_TEXT, font=font)
        left += width
    return strip


def with_legend(image: Image.Image, classes: Classes) -> Image.Image:
    """A new RGB image: ``image`` with the legend of ``classes`` on its right, as high as the image."""
    strip = legend(classes, image.height)
    combined = Image.new("RGB", (image.width + strip.width, image.height), LEGEND_BACKGROUND)
    combined.paste(image, (0, 0))
    combined.paste(strip, (image.width, 0))
    return combined


def overlay(photo: Image.Image, labels: np.ndarray, classes: Classes) -> Image.Image:
    """The overlay predict writes, drawn on the RGB ``photo`` (in place where it can be): binary, the fish tinted
    in OVERLAY_COLOUR; several classes, each class in its colour and a legend beside the photo."""
    if classes.binary:
        return tint(photo, labels > 0)
    return with_legend(tint_classes(photo, labels, classes), classes)
