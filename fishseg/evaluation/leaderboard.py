"""Render runs side by side: ``leaderboard.csv``, ``leaderboard.md``, ``val_iou_curves.png``, ``leaderboard.html``,
and ``leaderboard.json``, which records the entries' folders (so that a later compare knows whose leaderboard
it would replace).

Rendering only: the caller gathers the runs and the paired statistics (``fishseg.evaluation.stats``). One table
(``_table``) feeds both Markdown and HTML, so the two show the same text; every numeric HTML cell also
carries the full-precision value and its CSV column (``data-column``, ``data-value``), so the page can be
checked against the CSV. The HTML embeds its figure, so the page is one file that can be mailed.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import itertools
import json
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fishseg.evaluation.report import DPI, STYLE, fmt
from fishseg.evaluation.stats import PairedComparison
from fishseg.runtime import atomic_path, read_json

CSV_FILE, MD_FILE, PNG_FILE, HTML_FILE = "leaderboard.csv", "leaderboard.md", "val_iou_curves.png", "leaderboard.html"
SOURCES_FILE = "leaderboard.json"
METRIC_COLUMNS = ["mean_iou", "mean_iou_std", "mean_dice", "boundary_f", "pooled_iou", "folds", "epochs",
                  "epochs_planned", "train_seconds", "diff_vs_reference", "ci_low", "ci_high", "p_value",
                  "p_adjusted", "verdict"]
EXPLANATION = ("Δ IoU: mean over the same validation images of (entry − reference) per-image IoU (cross-validation: "
               "the mean over folds of each fold's mean, as the mean IoU shown), with its 95% paired bootstrap "
               "interval (images resampled within their fold); p: two-sided Wilcoxon signed-rank test on those "
               "differences; p Holm: p adjusted (Holm–Bonferroni) over all comparisons with the reference, "
               "which decides the verdict.")
LINE_STYLES = ("-", "--", ":")  # × 10 tab10 colours: 30 distinguishable curves besides the reference
REFERENCE_LINE = dict(color="black", lw=2.6, zorder=1.9)  # under the others, which stay visible on it
LEADERBOARD_STYLE = STYLE + """
body{max-width:none}.scroll{overflow-x:auto}.scroll table{font-size:.85em}.scroll td,.scroll th{padding:.25em .5em}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.num,td.verdict{white-space:nowrap}
tr.reference td{font-weight:600}td.better{background:#dff0d8}td.worse{background:#f8d7da}tr.unscored td{color:#777}"""


@dataclasses.dataclass(frozen=True)
class LeaderboardEntry:
    """One run (or one cross-validated set of folds) as the leaderboard shows it."""

    name: str
    differing: Mapping[str, str]  # config fields that differ between entries → value as text
    mean_iou: float
    mean_iou_std: float | None  # std over cross-validation folds; None for a single run
    mean_dice: float
    boundary_f: float
    pooled_iou: float
    folds: int  # 0 for a single run
    epochs: int  # epochs done
    epochs_planned: int
    train_seconds: float
    val_iou_curve: Sequence[float]  # mean validation IoU per epoch (mean over folds for CV)
    comparison: PairedComparison | None  # None for the reference entry
    # Several pixel classes: each class's IoU over the validation images (mean over folds); {} for binary
    class_ious: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class UnscoredEntry:
    """A config listed without scores (never the reference): its training failed, or is not far enough yet."""

    name: str
    differing: Mapping[str, str]
    verdict: str  # "failed: <reason>" or "unfinished: <what is missing>"


@dataclasses.dataclass(frozen=True)
class Cell:
    """A table cell: its text, for numbers the CSV column and value it shows, and its HTML class."""

    text: str
    column: str | None = None
    value: float | int | None = None
    css: str = ""


def write_leaderboard(out_dir: Path, entries: Sequence[LeaderboardEntry], *, reference: str,
                      notes: Sequence[str] = (), unscored: Sequence[UnscoredEntry] = (),
                      compared: Sequence[Path] = ()) -> dict[str, Path]:
    """Write the five files into ``out_dir``, entries sorted by mean IoU (best first) in all of them, the
    ``unscored`` ones after them; ``compared``: the folders of its entries (scored or not).

    Returns ``{"csv", "md", "png", "html", "json"}`` → path.
    """
    entries = _checked(entries, reference, unscored)
    fields = _field_columns([*entries, *unscored])
    score = _score_name(entries)
    explanation = EXPLANATION.replace("IoU", score)  # several classes: each image's mIoU is what is paired
    png = _png_bytes(_curves_figure(entries, reference, score))
    header, rows = _table(entries, unscored, fields, reference)
    contents = {"csv": _csv_text(entries, unscored, fields, reference).encode(), "png": png,
                "md": _markdown(header, rows, reference, notes, explanation).encode(),
                "html": _html(header, rows, reference, notes, png, explanation).encode(),
                "json": json.dumps({"compared": [str(folder.resolve()) for folder in compared]}, indent=2).encode()}
    paths = {"csv": out_dir / CSV_FILE, "md": out_dir / MD_FILE, "png": out_dir / PNG_FILE, "html": out_dir / HTML_FILE,
             "json": out_dir / SOURCES_FILE}
    for kind, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(contents[kind])
    return paths


def holds_leaderboard(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (CSV_FILE, MD_FILE, HTML_FILE, SOURCES_FILE))


def compared_folders(folder: Path) -> set[str] | None:
    """The folders (absolute) of the entries whose leaderboard ``folder`` holds (earlier leaderboards: of the
    folders as given, a sweep's among them); None when it does not say (none there, or older still)."""
    if not (folder / SOURCES_FILE).is_file():
        return None
    data = read_json(folder / SOURCES_FILE)
    return set(data["compared"]) if isinstance(data, dict) and isinstance(data.get("compared"), list) else None


def _checked(entries: Sequence[LeaderboardEntry], reference: str,
             unscored: Sequence[UnscoredEntry]) -> list[LeaderboardEntry]:
    """The entries sorted by mean IoU, best first (stable), after checking names and reference."""
    names = [entry.name for entry in (*entries, *unscored)]
    if not entries:
        raise ValueError("no entries to put on the leaderboard")
    if len(set(names)) != len(names):
        raise ValueError(f"entry names must be unique: {names}")
    if reference not in [entry.name for entry in entries]:
        raise ValueError(f"reference {reference!r} is not an entry name: {names}")
    return sorted(entries, key=lambda entry: -entry.mean_iou)


def _field_columns(entries: Sequence[LeaderboardEntry | UnscoredEntry]) -> dict[str, str]:
    """Differing config field → its column name, ``config_`` prefixed where it would clash with a score column
    (the config's ``epochs`` is the plan; the leaderboard's is what was done)."""
    fields = dict.fromkeys(field for entry in entries for field in entry.differing)
    return {field: f"config_{field}" if field in ("name", *METRIC_COLUMNS) else field for field in fields}


def _class_names(entries: Sequence[LeaderboardEntry]) -> list[str]:
    """The pixel classes whose IoU the table shows, in class order ([] for binary runs)."""
    return list(dict.fromkeys(name for entry in entries for name in entry.class_ious))


def _score_name(entries: Sequence[LeaderboardEntry]) -> str:
    """What a per-image score is: IoU (binary) or the image's mIoU (several classes)."""
    return "mIoU" if _class_names(entries) else "IoU"


def _verdict(entry: LeaderboardEntry, reference: str) -> str:
    if entry.comparison is not None:
        return entry.comparison.verdict
    return "reference" if entry.name == reference else "not compared"


def _csv_text(entries: list[LeaderboardEntry], unscored: Sequence[UnscoredEntry], fields: dict[str, str],
              reference: str) -> str:
    """One row per entry; floats in full precision (``repr``), empty cells where not applicable."""
    buffer = io.StringIO()
    classes = [f"iou:{name}" for name in _class_names(entries)]
    split = METRIC_COLUMNS.index("pooled_iou") + 1
    columns = [*METRIC_COLUMNS[:split], *classes, *METRIC_COLUMNS[split:]]
    writer = csv.DictWriter(buffer, fieldnames=["name", *fields.values(), *columns])
    writer.writeheader()
    for entry in entries:
        c = entry.comparison
        writer.writerow({
            "name": entry.name, **{column: entry.differing.get(field, "") for field, column in fields.items()},
            "mean_iou": entry.mean_iou, "mean_iou_std": "" if entry.mean_iou_std is None else entry.mean_iou_std,
            "mean_dice": entry.mean_dice, "boundary_f": entry.boundary_f, "pooled_iou": entry.pooled_iou,
            **{f"iou:{name}": value for name, value in entry.class_ious.items()},
            "folds": entry.folds, "epochs": entry.epochs, "epochs_planned": entry.epochs_planned,
            "train_seconds": entry.train_seconds,
            **({} if c is None else {"diff_vs_reference": c.mean_difference, "ci_low": c.ci_low,
                                     "ci_high": c.ci_high, "p_value": c.p_value, "p_adjusted": c.p_adjusted}),
            "verdict": _verdict(entry, reference)})  # missing keys are written as empty cells
    for other in unscored:
        writer.writerow({"name": other.name, "verdict": other.verdict,
                         **{column: other.differing.get(field, "") for field, column in fields.items()}})
    return buffer.getvalue()


def _table(entries: list[LeaderboardEntry], unscored: Sequence[UnscoredEntry], fields: dict[str, str],
           reference: str) -> tuple[list[str], list[list[Cell]]]:
    """Header and rows shared by the Markdown and the HTML table (an unscored entry: a dash for each number)."""
    score, classes = _score_name(entries), _class_names(entries)
    header = ["name", *fields.values(), f"mean {score}", "Dice", "boundary F", f"pooled {score}",
              *(f"IoU {name}" for name in classes), "epochs", "training (s)", f"Δ {score} vs {reference} [95% CI]",
              "p", "p Holm", "verdict"]
    rows = [[Cell(entry.name), *(Cell(entry.differing.get(field, "")) for field in fields),
             *_score_cells(entry, classes), *_comparison_cells(entry.comparison),
             _verdict_cell(_verdict(entry, reference))] for entry in entries]
    rows += [[Cell(other.name), *(Cell(other.differing.get(field, "")) for field in fields),
              *[Cell("—", css="num")] * (9 + len(classes)), Cell(other.verdict, css="verdict unscored")]
             for other in unscored]
    return header, rows


def _number(text: str, column: str, value: float | int) -> Cell:
    return Cell(text, column, value, "num")


def _verdict_cell(verdict: str) -> Cell:
    return Cell(verdict, css=f"verdict {verdict}" if verdict in ("better", "worse") else "verdict")


def _score_cells(entry: LeaderboardEntry, classes: Sequence[str]) -> list[Cell]:
    std = "" if entry.mean_iou_std is None else f" ± {fmt(entry.mean_iou_std)}"
    done = str(entry.epochs) if entry.epochs == entry.epochs_planned else f"{entry.epochs} of {entry.epochs_planned}"
    per_class = [_number(fmt(entry.class_ious[name]), f"iou:{name}", entry.class_ious[name])
                 if name in entry.class_ious else Cell("—", css="num") for name in classes]
    return [_number(fmt(entry.mean_iou) + std, "mean_iou", entry.mean_iou),
            _number(fmt(entry.mean_dice), "mean_dice", entry.mean_dice),
            _number(fmt(entry.boundary_f), "boundary_f", entry.boundary_f),
            _number(fmt(entry.pooled_iou), "pooled_iou", entry.pooled_iou), *per_class,
            _number(done, "epochs", entry.epochs),
            _number(f"{entry.train_seconds:.1f}", "train_seconds", entry.train_seconds)]


def _comparison_cells(c: PairedComparison | None) -> list[Cell]:
    if c is None:
        return [Cell("—", css="num")] * 3
    return [_number(f"{c.mean_difference:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]", "diff_vs_reference",
                    c.mean_difference),
            _number(f"{c.p_value:.2g}", "p_value", c.p_value),
            _number(f"{c.p_adjusted:.2g}", "p_adjusted", c.p_adjusted)]


def _markdown(header: list[str], rows: list[list[Cell]], reference: str, notes: Sequence[str],
              explanation: str) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("<", "&lt;") for cell in cells) + " |"

    lines = ["# fishseg leaderboard", "", f"Reference: {reference}. {explanation}", "", line(header),
             "|" + "---|" * len(header), *(line([cell.text for cell in row]) for row in rows)]
    lines += ["", *(f"- {note}" for note in notes), "", f"![validation IoU per epoch]({PNG_FILE})"]
    return "\n".join(lines) + "\n"


def _html_cell(cell: Cell) -> str:
    css = f' class="{cell.css}"' if cell.css else ""
    data = (f' data-column="{html.escape(cell.column)}" data-value="{html.escape(str(cell.value))}"'
            if cell.column else "")
    return f"<td{css}{data}>{html.escape(cell.text)}</td>"


def _html(header: list[str], rows: list[list[Cell]], reference: str, notes: Sequence[str], png: bytes,
          explanation: str) -> str:
    """``leaderboard.html``: one self-contained page (inline CSS, embedded PNG, no script, no network)."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(('<tr class="reference">' if row[0].text == reference else
                    '<tr class="unscored">' if "unscored" in row[-1].css else "<tr>")
                   + "".join(_html_cell(cell) for cell in row) + "</tr>" for row in rows)
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fishseg leaderboard</title><style>{LEADERBOARD_STYLE}</style>
</head><body>
<h1>fishseg leaderboard</h1>
<p>Reference: <strong>{html.escape(reference)}</strong>. {html.escape(explanation)}</p>
<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>
{f"<ul>{items}</ul>" if items else ""}
<figure><img src="data:image/png;base64,{image}" alt="validation IoU per epoch of every entry"></figure>
</body></html>
"""


def _curves_figure(entries: list[LeaderboardEntry], reference: str, score: str) -> Figure:
    """Validation ``score`` (IoU, or mIoU with several classes) per epoch, one line per entry (the reference thick
    and black), legend outside."""
    figure = Figure(figsize=(11, max(4.5, 1.0 + 0.2 * len(entries))), layout="constrained")
    axes = figure.subplots()
    styles = (dict(color=f"C{index % 10}", ls=LINE_STYLES[index // 10 % len(LINE_STYLES)], lw=1.5)
              for index in itertools.count())
    for entry in entries:  # in table order, so the legend reads like the table
        is_reference = entry.name == reference
        axes.plot(range(1, len(entry.val_iou_curve) + 1), entry.val_iou_curve, marker=".", ms=4,
                  label=f"{entry.name} (reference)" if is_reference else entry.name,
                  **(REFERENCE_LINE if is_reference else next(styles)))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title=f"Validation {score} per epoch (mean over folds for cross-validation)", xlabel="epoch",
             ylabel=f"mean validation {score}")
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize=8 if len(entries) > 12 else 10)
    return figure


def _png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, rendered once: the same bytes go to the file and into the page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
