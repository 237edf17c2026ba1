"""compare with several pixel classes: per-image mIoU paired as IoU is, and the per-class IoU of each entry in
every leaderboard file; binary leaderboards keep their columns."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from fishseg.evaluation.leaderboard import LeaderboardEntry, UnscoredEntry, write_leaderboard
from fishseg.evaluation.stats import PairedComparison

from tests.test_leaderboard import CSV_COLUMNS, ENTRIES

CLASS_IOUS = {"seed-cnn": {"background": 0.9, "cod": 0.6, "reef": 0.4},
              "linear": {"background": 0.8, "cod": 0.5}}  # reef never seen by linear: no IoU for it


def multiclass_entries() -> list[LeaderboardEntry]:
    return [dataclasses.replace(entry, class_ious=CLASS_IOUS[entry.name]) for entry in ENTRIES
            if entry.name in CLASS_IOUS]


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or ()), list(reader)


def test_csv_adds_a_column_per_class_after_pooled(tmp_path: Path) -> None:
    board = write_leaderboard(tmp_path, multiclass_entries(), reference="seed-cnn",
                              unscored=[UnscoredEntry("broken", {}, "failed: loss is NaN")])
    columns, rows = read_rows(board["csv"])
    split = CSV_COLUMNS.index("pooled_iou") + 1
    expected = CSV_COLUMNS[:split] + ["iou:background", "iou:cod", "iou:reef"] + CSV_COLUMNS[split:]
    assert columns == expected
    by_name = {row["name"]: row for row in rows}
    assert float(by_name["seed-cnn"]["iou:reef"]) == 0.4
    assert by_name["linear"]["iou:reef"] == ""
    assert float(by_name["linear"]["iou:cod"]) == 0.5
    assert by_name["broken"]["iou:cod"] == ""


def test_tables_say_miou_and_show_class_columns(tmp_path: Path) -> None:
    board = write_leaderboard(tmp_path, multiclass_entries(), reference="seed-cnn",
                              unscored=[UnscoredEntry("broken", {}, "failed: loss is NaN")])
    markdown = board["md"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| name"))
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    assert cells[cells.index("pooled mIoU") + 1:cells.index("pooled mIoU") + 4] == \
        ["IoU background", "IoU cod", "IoU reef"]
    assert "mean mIoU" in cells and "Δ mIoU vs seed-cnn [95% CI]" in cells
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line not in (header,)][1:]
    assert all(len(row.strip("|").split("|")) == len(cells) for row in rows)  # unscored rows as wide
    page = board["html"].read_text()
    assert 'data-column="iou:reef" data-value="0.4"' in page


def test_binary_leaderboard_has_no_class_columns(tmp_path: Path) -> None:
    comparison = PairedComparison(40, 0.01, 0.0, 0.02, 0.04, 0.04, "better")
    board = write_leaderboard(tmp_path, [ENTRIES[0], dataclasses.replace(ENTRIES[1], comparison=comparison)],
                              reference="seed-cnn")
    columns, _ = read_rows(board["csv"])
    assert not [column for column in columns if column.startswith("iou:")]
    assert "mean IoU" in board["md"].read_text() and "mIoU" not in board["md"].read_text()
