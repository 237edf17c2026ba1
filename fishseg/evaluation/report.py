"""Render an evaluated run: training curves, analysis plots, galleries, ``report.html`` and ``report.md``.

Everything here is drawn from what ``fishseg.evaluation.evaluate`` computed (``ReportData``); no number is
computed twice, so the page, the Markdown and ``metrics.json`` agree by construction. Figures use
matplotlib's object API (no pyplot global state, no display needed). A run with several pixel classes adds a
per-class table and the pixel confusion matrix, shows its galleries in the class colours, and has no threshold.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import html
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
from matplotlib import font_manager, ft2font
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.decomposition import PCA

from fishseg.classes import Classes
from fishseg.drawing import tint_classes
from fishseg.formats.runs import (ANALYSIS_FILES, CLASS_ANALYSIS_FILES, CURVE_FILES, EPOCHS_CSV, GALLERY_FILES,
                                  REPORT_HTML, REPORT_MD)
from fishseg.runtime import atomic_path, plural

DPI = 100
GALLERY_RANDOM, GALLERY_EXTREMES, PCA_EXAMPLES = 20, 5, 4
GALLERY_TITLES = {"random": ("random validation image", ""), "best": ("best validation image", " by IoU"),
                  "worst": ("worst validation image", " by IoU")}  # (noun, what follows the count and noun)
OVERLAY_COLOURS = {  # region → (colour name for the legend, RGB)
    "true positive": ("green", (46, 204, 64)),
    "false positive": ("red", (255, 65, 54)),
    "false negative": ("blue", (0, 116, 217)),
}
TRAIN_COLOUR, VAL_COLOUR = "tab:blue", "tab:orange"
RANDOM_INIT_NOTE = "Backbone is random-init: these numbers measure the pipeline, not what DINOv3 features can do."
REFERENCE_NOTE = ("Reference batch IoU is the number the reference notebook reports as validation IoU: the mean, over "
                  "validation batches in loader order, of the IoU of all the batch's pixels pooled, so large fish "
                  "weigh more and the batching matters; mean IoU weighs every image alike.")

CURVES = dict(zip(CURVE_FILES, (  # file → (title, history split, value, y label)
    ("Train loss per iteration", "train", "loss", "BCE loss"),
    ("Train IoU per iteration", "train", "iou", "IoU (threshold 0.5)"),
    ("Loss per epoch, train vs val (mean ± std over images)", None, "loss", "BCE loss"),
    ("Validation loss per iteration", "val", "loss", "BCE loss"),
    ("IoU per epoch, train vs val (mean ± std over images)", None, "iou", "IoU (threshold 0.5)"),
    ("Validation IoU per iteration", "val", "iou", "IoU (threshold 0.5)"),
), strict=True))
CLASS_EPOCH_TITLE = "Dataset mIoU per epoch, train vs val (band: ± std of the per-image mIoU)"  # several classes
MIOU_NOTE = ("Dataset mIoU is the standard score of several classes: each class's IoU over all validation pixels, "
             "averaged over the classes true or predicted anywhere; per-image mIoU averages each image's own mIoU "
             "(over the classes in that image), so every image weighs alike.")
PIXEL_SCORES = ("iou", "dice", "precision", "recall", "boundary_f")  # per pixel class, as metrics.json names them
MISSING = "–"  # a per-class score of a class neither true nor predicted in the split


def _worded(text: str, classes: Classes) -> str:
    """A label as a run with ``classes`` says it: binary as written; with several classes "BCE loss" is "loss" and
    "IoU" (at the threshold) "mIoU"."""
    if classes.binary:
        return text
    return re.sub(r"\bIoU( \(threshold 0\.5\))?", "mIoU", text.replace("BCE loss", "loss"))


@dataclasses.dataclass
class Example:
    """One validation image as a gallery shows it."""

    image_id: str
    class_name: str
    iou: float  # mIoU with several classes
    preview: np.ndarray  # P×P×3 uint8
    truth: np.ndarray  # S×S bool (binary) or uint8 class indices
    pred: np.ndarray  # S×S bool (binary) or uint8 class indices
    features: np.ndarray  # h×w×D cached patch grid


@dataclasses.dataclass
class ReportData:
    metrics: dict[str, Any]
    run: dict[str, Any]
    history: dict[str, Any]
    ious: np.ndarray  # per validation image, at the metrics threshold
    galleries: dict[str, list[Example]]  # keys of GALLERY_TITLES
    pca_sample: np.ndarray  # M×D validation patch features that fit the PCA
    classes: Classes = Classes()  # the run's pixel classes


def gallery_positions(ious: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Positions (into ``ious``) of the random, best and worst galleries."""
    order = np.argsort(ious, kind="stable")
    random = np.random.default_rng(seed).choice(len(ious), min(GALLERY_RANDOM, len(ious)), replace=False)
    return {"random": np.sort(random), "best": order[::-1][:GALLERY_EXTREMES], "worst": order[:GALLERY_EXTREMES]}


def fmt(value: float) -> str:
    """The one number format of every report, so HTML, Markdown and tests agree."""
    return f"{value:.4f}"


def _save(figure: Figure, path: Path) -> None:
    """Draw ``figure`` once (its layout, then its pixels) and write the pixels ``savefig`` would: savefig draws a
    figure with a layout engine twice, once to lay it out and once to render it. zlib level 1: a third of the
    encoding time of the default level for files ~15% larger (a gallery is ~1 MB)."""
    figure.set_dpi(DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, canvas.buffer_rgba(), format="png", origin="upper", dpi=DPI,
                                pil_kwargs={"compress_level": 1})


def _iteration_figure(points: list[dict[str, float]], value: str, title: str, ylabel: str) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    values = np.array([p[value] for p in points])
    steps = np.arange(1, len(values) + 1)
    per_epoch = max(1, len(values) // max(1, points[-1]["epoch"]))
    faint = dict(lw=0.6, alpha=0.45) if per_epoch > 1 else dict(lw=1.5, marker="o", ms=3)
    axes.plot(steps, values, color=TRAIN_COLOUR, label="per iteration (batch mean)", **faint)
    if per_epoch > 1:
        smooth = np.convolve(values, np.ones(per_epoch) / per_epoch, mode="valid")
        axes.plot(steps[per_epoch - 1:], smooth, lw=1.8, color="black", label=f"moving mean over {per_epoch}")
    axes.set(title=title, xlabel="iteration (batch)", ylabel=ylabel)
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    return figure


def _epoch_figure(epochs: list[dict[str, float]], value: str, title: str, ylabel: str) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    x = np.array([e["epoch"] for e in epochs])
    for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
        mean = np.array([e[f"{split}_{value}"] for e in epochs])
        std = np.array([e[f"{split}_{value}_std"] for e in epochs])
        axes.plot(x, mean, marker="o", ms=3, color=colour, label=f"{split} mean")
        axes.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, label=f"{split} ± std")
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    return figure


def _per_class_figure(per_class: dict[str, dict[str, Any]]) -> Figure:
    names = sorted(per_class, key=lambda name: per_class[name]["mean_iou"])
    figure = Figure(figsize=(8, 1.2 + 0.45 * len(names)), layout="constrained")
    axes = figure.subplots()
    y = np.arange(len(names))
    axes.barh(y - 0.2, [per_class[n]["mean_iou"] for n in names], 0.4, label="mean IoU")
    axes.barh(y + 0.2, [per_class[n]["mean_dice"] for n in names], 0.4, label="mean Dice")
    axes.set_yticks(y, [f"{n} ({per_class[n]['n_images']})" for n in names])
    axes.set(title="Per-class validation scores (images in brackets)", xlabel="score", xlim=(0, 1))
    figure.legend(loc="outside lower center", ncol=2)
    axes.grid(axis="x", alpha=0.3)
    return figure


def _histogram_figure(ious: np.ndarray, classes: Classes) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.hist(ious, bins=np.linspace(0, 1, 41), color=TRAIN_COLOUR, edgecolor="white")
    axes.axvline(ious.mean(), color="black", label=f"mean {fmt(ious.mean())}")
    axes.axvline(np.median(ious), color="black", ls="--", label=f"median {fmt(np.median(ious))}")
    axes.set(title=_worded(f"IoU over {plural(len(ious), 'validation image')}", classes),
             xlabel=_worded("IoU (threshold 0.5)", classes), ylabel="images")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="upper left")
    return figure


def _threshold_figure(sweep: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(sweep["thresholds"], sweep["mean_iou"], marker="o", ms=3, label="mean IoU")
    axes.plot(sweep["thresholds"], sweep["mean_dice"], marker="o", ms=3, label="mean Dice")
    axes.plot([sweep["best_threshold"]], [sweep["best_mean_iou"]], "k*", ms=14,
              label=f"best IoU {fmt(sweep['best_mean_iou'])} at {sweep['best_threshold']} (chosen on val)")
    axes.set(title="Validation scores against the probability threshold", xlabel="threshold", ylabel="score")
    axes.legend(loc="lower center")
    axes.grid(alpha=0.3)
    return figure


def _matrix_figure(names: list[str], matrix: np.ndarray, cells: list[str], noun: str, title: str,
                   bar: dict[str, Any], scale: dict[str, float]) -> Figure:
    """A confusion matrix (rows true, columns predicted ``noun``) with ``cells`` (row by row) written in it;
    ``scale``: imshow's vmin/vmax (default the matrix's range); ``bar``: the colour bar's keywords."""
    side = 2.5 + 0.6 * len(names)
    figure = Figure(figsize=(side + 2, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues", **scale)
    middle = scale.get("vmax", matrix.max()) / 2
    for ((row, column), value), cell in zip(np.ndenumerate(matrix), cells):
        axes.text(column, row, cell, ha="center", va="center", color="white" if value > middle else "black")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set(xlabel=f"predicted {noun}", ylabel=f"true {noun}")
    # a figure title on two lines: one line over the axes ran into the image edge (the colour bar takes the right)
    figure.suptitle(title)
    figure.colorbar(image, ax=axes, **bar)
    return figure


def _probe_figure(probe: dict[str, Any]) -> Figure:
    confusion = np.array(probe["confusion"])
    return _matrix_figure(probe["classes"], confusion, [str(count) for count in confusion.ravel()], "species",
                          f"Species probe on pooled features\naccuracy {fmt(probe['accuracy'])}",
                          dict(label="validation images", ticks=MaxNLocator(integer=True)), {})


def _pixel_confusion_figure(pixel: dict[str, Any]) -> Figure:
    """metrics.json's ``pixel_classes`` confusion, each row (a true class) normalised to its pixels."""
    confusion = np.array(pixel["confusion"])
    return _matrix_figure(pixel["names"], confusion, [f"{share:.2f}" for share in confusion.ravel()], "class",
                          f"Pixel classes (rows: true class, normalised)\npixel accuracy "
                          f"{fmt(pixel['pixel_accuracy'])}, dataset mIoU {fmt(pixel['miou'])}",
                          dict(label="share of the true class's pixels"),
                          dict(vmin=0.0, vmax=1.0))


def _pca_rgb(sample: np.ndarray, grids: list[np.ndarray]) -> list[np.ndarray]:
    """First three principal components of patch features as RGB in [0, 1] (1st–99th percentile)."""
    pca = PCA(n_components=3, random_state=0).fit(sample.astype(np.float32))
    low, high = np.percentile(pca.transform(sample.astype(np.float32)), [1, 99], axis=0)
    return [np.clip((pca.transform(grid.reshape(-1, grid.shape[-1]).astype(np.float32)).reshape(*grid.shape[:2], 3)
                     - low) / np.maximum(high - low, 1e-6), 0, 1) for grid in grids]


def _pca_figure(examples: list[Example], sample: np.ndarray) -> Figure:
    rgbs = _pca_rgb(sample, [example.features for example in examples])
    figure = Figure(figsize=(2.9 * len(examples) + 0.4, 6.4), layout="constrained")
    figure.suptitle("Cached patch features: first 3 principal components as RGB (PCA fitted on validation patches)")
    axes = figure.subplots(2, len(examples), squeeze=False)
    for column, (example, rgb) in enumerate(zip(examples, rgbs)):
        axes[0, column].imshow(example.preview)
        title, families = _legible(_short_id(example.image_id))
        axes[0, column].set_title(title, fontsize=9, fontfamily=families)
        axes[1, column].imshow(rgb, interpolation="nearest")
        axes[1, column].set_title(f"{rgb.shape[0]}×{rgb.shape[1]} patch grid", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    return figure


def overlay(example: Example, classes: Classes = Classes()) -> np.ndarray:
    """Preview at mask size with true positives, false positives and false negatives coloured (binary), or each
    predicted class tinted as predict's overlays are (``fishseg.drawing.tint_classes``)."""
    preview = Image.fromarray(example.preview).resize(example.truth.shape[::-1], Image.Resampling.BILINEAR)
    if not classes.binary:
        return np.asarray(tint_classes(preview.convert("RGB"), example.pred, classes))
    base = np.asarray(preview, dtype=np.float64)
    truth, pred = example.truth, example.pred
    for region, (_, colour) in zip((truth & pred, pred & ~truth, truth & ~pred), OVERLAY_COLOURS.values()):
        base[region] = 0.45 * base[region] + 0.55 * np.array(colour)
    return base.astype(np.uint8)


def _shown(mask: np.ndarray, classes: Classes) -> np.ndarray:
    """A gallery's truth or prediction panel: a binary mask as it is (drawn grey), class indices H×W in the class
    colours (RGB H×W×3 uint8)."""
    return mask if classes.binary else np.asarray(classes.colours, dtype=np.uint8)[mask]


def _font(path: str) -> tuple[str, frozenset[int]] | None:
    try:
        face = ft2font.FT2Font(path)
    except (OSError, RuntimeError):
        return None
    return face.family_name, frozenset(face.get_charmap())


@functools.cache
def _default_font() -> tuple[str, frozenset[int]]:
    """(family, code points it draws) of matplotlib's default font (DejaVu Sans)."""
    return _font(font_manager.findfont("DejaVu Sans"))


@functools.cache
def _other_fonts() -> tuple[tuple[str, frozenset[int]], ...]:
    """The same for every other installed font: read only when a title holds a character the default lacks
    (reading them all costs ~0.5 s)."""
    default = font_manager.findfont("DejaVu Sans")
    fonts = (_font(path) for path in sorted({font.fname for font in font_manager.fontManager.ttflist} - {default}))
    return tuple(font for font in fonts if font is not None)


def _legible(text: str) -> tuple[str, list[str]]:
    """``text`` and the font families that draw it: the default, then for each character it lacks (a CJK file
    name) the first installed font that has it. A character no font has becomes "?": matplotlib would draw a box
    and warn."""
    default_family, default_chars = _default_font()
    families, shown = [default_family], []
    for char in text:
        if ord(char) in default_chars:
            shown.append(char)
            continue
        family = next((name for name, covered in _other_fonts() if ord(char) in covered), None)
        if family is None and not char.isspace():
            char = "?"
        elif family is not None and family not in families:
            families.append(family)
        shown.append(char)
    return "".join(shown), families


def _short_id(image_id: str) -> str:
    """The last two path parts: enough to find the file, short enough for a panel title."""
    return "/".join(image_id.split("/")[-2:])


def _legend(figure: Figure, title: str, classes: Classes) -> None:
    """The gallery's title and what its colours mean: in the title (binary), or a legend of the class colours."""
    if classes.binary:
        legend = ", ".join(f"{region} {colour}" for region, (colour, _) in OVERLAY_COLOURS.items())
        figure.suptitle(f"{title} ({legend})", fontsize=13)
        return
    figure.suptitle(title, fontsize=13)
    patches = [Patch(facecolor=np.array(colour) / 255, edgecolor="grey", label=name)
               for name, colour in zip(classes.names, classes.colours)]
    figure.legend(handles=patches, loc="outside lower center", ncol=min(len(patches), 8), fontsize=10)


def _gallery_figure(examples: list[Example], title: str, classes: Classes = Classes()) -> Figure:
    per_row = 2 if len(examples) > 1 else 1
    rows = -(-len(examples) // per_row)
    figure = Figure(figsize=(8.4 * per_row, 2.45 * rows + 0.7), layout="constrained")
    _legend(figure, title, classes)
    panels = np.asarray(figure.subfigures(rows, per_row, squeeze=False)).ravel()
    for panel, example in zip(panels, examples):
        title, families = _legible(f"{_short_id(example.image_id)} · {example.class_name} · "
                                   f"{_worded('IoU', classes)} {fmt(example.iou)}")
        panel.suptitle(title, fontsize=10, fontfamily=families)
        axes = panel.subplots(1, 4)
        images = (example.preview, _shown(example.truth, classes), _shown(example.pred, classes),
                  overlay(example, classes))
        for ax, image, name in zip(axes, images, ("image", "ground truth", "prediction", "overlay")):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1) if image.ndim == 2 else ax.imshow(image)
            ax.set_title(name, fontsize=9)
            ax.set_axis_off()
    return figure


def write_figures(out_dir: Path, data: ReportData) -> dict[str, str]:
    """Write every PNG, each drawn once; returns ``{section key: file name}`` in display order."""
    files: dict[str, str] = {}
    for name, (title, split, value, ylabel) in CURVES.items():
        title, ylabel = _worded(title, data.classes), _worded(ylabel, data.classes)
        if value == "iou" and split is None and not data.classes.binary:
            title = CLASS_EPOCH_TITLE  # history's val_iou is the dataset mIoU, its std that of the per-image mIoU
        figure = (_iteration_figure(data.history["iterations"][split], value, title, ylabel) if split
                  else _epoch_figure(data.history["epochs"], value, title, ylabel))
        _save(figure, out_dir / name)
        files[name] = name
    for key, figure in _analysis_figures(data).items():
        name = {**ANALYSIS_FILES, **CLASS_ANALYSIS_FILES}[key]
        _save(figure, out_dir / name)
        files[key] = name
    for key, examples in data.galleries.items():
        noun, rest = GALLERY_TITLES[key]
        _save(_gallery_figure(examples, plural(len(examples), noun) + _worded(rest, data.classes), data.classes),
              out_dir / GALLERY_FILES[key])
        files[f"gallery_{key}"] = GALLERY_FILES[key]
    return files


def _analysis_figures(data: ReportData) -> dict[str, Figure]:
    """The figures between the curves and the galleries, by their key in ANALYSIS_FILES or CLASS_ANALYSIS_FILES:
    the threshold sweep only for a binary run, the pixel confusion only with several classes."""
    metrics = data.metrics
    analysis = {"per_class": _per_class_figure(metrics["per_class"]), "histogram": _histogram_figure(data.ious,
                                                                                                    data.classes)}
    if "threshold_sweep" in metrics:
        analysis["threshold"] = _threshold_figure(metrics["threshold_sweep"])
    analysis["pca"] = _pca_figure(data.galleries["random"][:PCA_EXAMPLES], data.pca_sample)
    if "accuracy" in metrics["species_probe"]:
        analysis["probe"] = _probe_figure(metrics["species_probe"])
    if "pixel_classes" in metrics:
        analysis["pixel_confusion"] = _pixel_confusion_figure(metrics["pixel_classes"])
    return analysis


def summary_rows(data: ReportData) -> list[tuple[str, str, str | None]]:
    """(label, value, metrics key or None) for the header of both pages; a key inside ``pixel_classes`` is written
    ``pixel_classes.KEY``."""
    metrics, run, config = data.metrics, data.run, data.run["train_config"]
    scores = _binary_rows(metrics) if data.classes.binary else _class_rows(metrics, data.classes)
    return [
        ("backbone", metrics["backbone"] + (" (RANDOM-INIT)" if metrics["random_init"] else ""), None),
        ("cache fingerprint", metrics["cache_fingerprint"], None),
        ("split", f"{run['split']['method']}: {run['split']['n_train']} train / {run['split']['n_val']} val, "
                  f"seed {config['seed']}", None),
        ("val images with a near-duplicate in train", str(metrics["val_with_duplicate_in_train"]),
         "val_with_duplicate_in_train"),
        ("training", f"{config['decoder']}, {config['epochs']} epochs, batch {config['batch_size']}, lr {config['lr']}"
                     + ("" if run["status"] == "finished" else
                        f" (stopped at epoch {run['epochs_done']} of {run['epochs_planned']}: {run['status']})"),
         None),
        ("checkpoint", f"{metrics['checkpoint']} (epoch {metrics['epoch']})", None),
        ("validation images", str(metrics["n_images"]), "n_images"),
        *scores,
    ]


def _probe_row(metrics: dict[str, Any]) -> tuple[str, str, None]:
    probe = metrics["species_probe"]
    return ("species probe accuracy (pooled features)", fmt(probe["accuracy"]) if "accuracy" in probe
            else f"skipped: {probe['skipped']}", None)


def _binary_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    sweep = metrics["threshold_sweep"]
    return [
        ("mean IoU", fmt(metrics["mean_iou"]), "mean_iou"),
        (f"reference batch IoU (batches of {metrics['reference_batch_size']}, pixels pooled)",
         fmt(metrics["reference_batch_iou"]), "reference_batch_iou"),
        ("mean Dice", fmt(metrics["mean_dice"]), "mean_dice"),
        ("median IoU", fmt(metrics["median_iou"]), "median_iou"),
        ("median Dice", fmt(metrics["median_dice"]), "median_dice"),
        ("mean precision / recall", f"{fmt(metrics['mean_precision'])} / {fmt(metrics['mean_recall'])}", None),
        (f"mean boundary F ({metrics['boundary_tolerance_px']} px)", fmt(metrics["mean_boundary_f"]),
         "mean_boundary_f"),
        ("pooled IoU (all pixels)", fmt(metrics["pooled_iou"]), "pooled_iou"),
        ("threshold", str(metrics["threshold"]), "threshold"),
        ("best threshold on val (optimistic)", f"{sweep['best_threshold']} → mean IoU {fmt(sweep['best_mean_iou'])}",
         None),
        _probe_row(metrics),
    ]


def _class_rows(metrics: dict[str, Any], classes: Classes) -> list[tuple[str, str, str | None]]:
    pixel = metrics["pixel_classes"]
    rows = [
        ("pixel classes", classes.describe(), None),
        ("dataset mIoU (per-class IoU over all pixels, averaged over classes)", fmt(pixel["miou"]),
         "pixel_classes.miou"),
        ("per-image mIoU (mean over images)", fmt(pixel["miou_per_image"]), "pixel_classes.miou_per_image"),
        ("pixel accuracy", fmt(pixel["pixel_accuracy"]), "pixel_classes.pixel_accuracy"),
        ("median per-image mIoU", fmt(metrics["median_iou"]), "median_iou"),
        ("mean Dice (per image, over its classes)", fmt(metrics["mean_dice"]), "mean_dice"),
        ("mean precision / recall (per image, over its classes)",
         f"{fmt(metrics['mean_precision'])} / {fmt(metrics['mean_recall'])}", None),
        (f"mean boundary F ({metrics['boundary_tolerance_px']} px, per image, over its classes)",
         fmt(metrics["mean_boundary_f"]), "mean_boundary_f"),
        _probe_row(metrics),
    ]
    if "species_accuracy" in pixel:
        rows.append(("species accuracy of the pixel labels (dominant predicted class)",
                     fmt(pixel["species_accuracy"]), "pixel_classes.species_accuracy"))
    return rows


def _score(value: float | None) -> str:
    return MISSING if value is None else fmt(value)


def pixel_class_rows(pixel: dict[str, Any]) -> list[list[str]]:
    """The per-class table of a run with several classes, from metrics.json's ``pixel_classes``."""
    return [[name, *(_score(scores[metric]) for metric in PIXEL_SCORES), str(scores["true_pixels"]),
             str(scores["predicted_pixels"])] for name, scores in pixel["per_class"].items()]


PIXEL_CLASS_HEADER = ["pixel class", "IoU", "Dice", "precision", "recall", "boundary F", "true pixels",
                      "predicted pixels"]


def per_class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [[name, str(c["n_images"]), fmt(c["mean_iou"]), fmt(c["median_iou"]), fmt(c["mean_dice"]),
             fmt(c["median_dice"]), f"{c['worst_image']} ({fmt(c['worst_iou'])})"]
            for name, c in metrics["per_class"].items()]


PER_CLASS_HEADER = ["class", "images", "mean IoU", "median IoU", "mean Dice", "median Dice", "worst image (IoU)"]
EPOCH_HEADER = ["epoch", "train loss", "train IoU", "val loss", "val IoU", "seconds"]


def epoch_rows(history: dict[str, Any]) -> list[list[str]]:
    return [[str(e["epoch"]), fmt(e["train_loss"]), fmt(e["train_iou"]), fmt(e["val_loss"]), fmt(e["val_iou"]),
             f"{e['seconds']:.1f}"] for e in history["epochs"]]


def _tables(data: ReportData) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Title → (header, rows) of the tables both pages show: the pixel classes (several classes only), the image
    classes and the epochs."""
    pixel = data.metrics.get("pixel_classes")
    per_class, epochs = ([_worded(cell, data.classes) for cell in header]
                         for header in (PER_CLASS_HEADER, EPOCH_HEADER))
    if pixel:  # beside the pixel classes, say that these are the images' folders
        per_class[0] = "image class (folder)"
    return {**({"Pixel classes": (PIXEL_CLASS_HEADER, pixel_class_rows(pixel))} if pixel else {}),
            "Per class": (per_class, per_class_rows(data.metrics)), "Epochs": (epochs, epoch_rows(data.history))}


def _note(data: ReportData) -> str:
    """What the headline numbers are: the reference batch IoU (binary), or the two mIoUs."""
    return REFERENCE_NOTE if data.classes.binary else MIOU_NOTE


def markdown(data: ReportData, files: dict[str, str]) -> str:
    lines = ["# fishseg report", ""]
    lines += [f"- {label}: {value}" for label, value, _ in summary_rows(data)]
    lines += ["", _note(data)]
    if data.metrics["random_init"]:
        lines += ["", f"**{RANDOM_INIT_NOTE}**"]
    for title, (header, rows) in _tables(data).items():
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in files.values()]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_row(label: str, value: str, metric_key: str | None) -> str:
    """A header row; values that come from metrics.json carry ``data-metric`` so tests can compare them."""
    attribute = f' data-metric="{metric_key}"' if metric_key else ""
    return f"<tr><th>{html.escape(label)}</th><td{attribute}>{html.escape(value)}</td></tr>"


def _img(name: str) -> str:
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}"></figure>'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}
.warning{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:0 1em}"""


def page(data: ReportData, files: dict[str, str]) -> str:
    """``report.html``: one page, images referenced beside it, no scripts, no network."""
    summary = "".join(_summary_row(*row) for row in summary_rows(data))
    warning = f'<p class="warning">{html.escape(RANDOM_INIT_NOTE)}</p>' if data.metrics["random_init"] else ""
    curves = "".join(_img(files[name]) for name in CURVES)
    analysis = "".join(_img(files[key]) for key in ("histogram", "threshold") if key in files)
    galleries = "".join(_img(files[f"gallery_{key}"]) for key in data.galleries)
    tables = {title: _html_table(*table) for title, table in _tables(data).items()}
    pixel_classes = (f'<h2>Pixel classes</h2>{tables["Pixel classes"]}{_img(files["pixel_confusion"])}'
                     if "Pixel classes" in tables else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fishseg report</title><style>{STYLE}</style></head><body>
<h1>fishseg report</h1>{warning}
<table class="summary">{summary}</table>
<p>{html.escape(_note(data))}</p>
<p>Per-image scores: <a href="per_image.csv">per_image.csv</a>;
all numbers: <a href="metrics.json">metrics.json</a>.</p>
<h2>Training curves</h2><div class="grid">{curves}</div>
<h2>Epoch log</h2>{tables["Epochs"]}<p><a href="{EPOCHS_CSV}">{EPOCHS_CSV}</a></p>{pixel_classes}
<h2>Per class</h2>{tables["Per class"]}{_img(files["per_class"])}
<h2>Distribution{" and threshold" if "threshold" in files else ""}</h2><div class="grid">{analysis}</div>
<h2>What the cached features carry</h2>{_img(files["pca"])}{_img(files["probe"]) if "probe" in files else ""}
<h2>Galleries</h2>{galleries}
</body></html>
"""


def _write_epochs_csv(path: Path, epochs: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(epochs[0]))
        writer.writeheader()
        writer.writerows(epochs)


def write_report(out_dir: Path, data: ReportData) -> Path:
    """Write figures, ``epochs.csv``, ``report.md`` and ``report.html`` into ``out_dir``; returns the HTML path."""
    files = write_figures(out_dir, data)
    _write_epochs_csv(out_dir / EPOCHS_CSV, data.history["epochs"])
    for name, text in ((REPORT_MD, markdown(data, files)), (REPORT_HTML, page(data, files))):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return out_dir / REPORT_HTML
