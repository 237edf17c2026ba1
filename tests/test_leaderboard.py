from __future__ import annotations

import base64
import csv
import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishseg.evaluation.leaderboard import LeaderboardEntry, write_leaderboard
from fishseg.evaluation.report import DPI
from fishseg.evaluation.stats import PairedComparison

ESCAPED = "loss=bce+dice,<x>"
NOTES = ["2 runs were skipped: no per-image scores", "Validation images: 40, the same for every entry"]
CSV_COLUMNS = ["name", "decoder", "loss", "mean_iou", "mean_iou_std", "mean_dice", "boundary_f", "pooled_iou",
               "folds", "epochs", "epochs_planned", "train_seconds", "diff_vs_reference", "ci_low", "ci_high",
               "p_value", "p_adjusted", "verdict"]


def entry(name: str, differing: dict[str, str], mean_iou: float, comparison: PairedComparison | None, *,
          std: float | None = None, folds: int = 0, epochs: int = 20) -> LeaderboardEntry:
    curve = list(np.linspace(0.3, mean_iou, epochs))
    return LeaderboardEntry(name, differing, mean_iou, std, mean_iou - 0.05, mean_iou / 3, mean_iou - 0.02, folds,
                            epochs, 20, 12.5 * epochs, curve, comparison)


ENTRIES = [  # in no particular order: the leaderboard sorts by mean IoU
    entry("seed-cnn", {"decoder": "seed-cnn", "loss": "bce"}, 0.7681234567, None),
    entry("linear", {"decoder": "linear", "loss": "bce"}, 0.62912345678, epochs=12,
          comparison=PairedComparison(40, -0.0123, -0.031, 0.005, 0.0412, 0.0824, "no detectable difference (n=40)")),
    entry("progressive", {"decoder": "progressive", "loss": "bce"}, 0.78123456, std=0.021, folds=5,
          comparison=PairedComparison(40, 0.0131, 0.0062, 0.0204, 0.00012, 0.00036, "better")),
    entry(ESCAPED, {"loss": "bce+dice"}, 0.7700001, comparison=PairedComparison(
        40, 0.0019, -0.004, 0.0078, 0.51234, 0.51234, "no detectable difference (n=40)")),
]
ORDER = ["progressive", ESCAPED, "seed-cnn", "linear"]  # by mean IoU, best first


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_leaderboard(tmp_path_factory.mktemp("board") / "compare", ENTRIES, reference="seed-cnn", notes=NOTES)


def csv_rows(board: dict[str, Path]) -> list[dict[str, str]]:
    with board["csv"].open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_file_is_written(board: dict[str, Path]) -> None:
    assert {kind: path.name for kind, path in board.items()} == {
        "csv": "leaderboard.csv", "md": "leaderboard.md", "png": "val_iou_curves.png", "html": "leaderboard.html",
        "json": "leaderboard.json"}
    assert not list(board["csv"].parent.glob(".*.tmp"))
    assert Image.open(board["png"]).size == (11 * DPI, int(4.5 * DPI))


def test_csv_holds_every_input_value(board: dict[str, Path]) -> None:
    rows = csv_rows(board)
    assert list(rows[0]) == CSV_COLUMNS
    assert [row["name"] for row in rows] == ORDER
    by_name = {row["name"]: row for row in rows}
    for given in ENTRIES:
        row, c = by_name[given.name], given.comparison
        assert {key: row[key] for key in ("decoder", "loss")} == {key: given.differing.get(key, "")
                                                                  for key in ("decoder", "loss")}
        assert [float(row[key]) for key in ("mean_iou", "mean_dice", "boundary_f", "pooled_iou", "train_seconds")] \
            == [given.mean_iou, given.mean_dice, given.boundary_f, given.pooled_iou, given.train_seconds]
        assert [int(row[key]) for key in ("folds", "epochs", "epochs_planned")] \
            == [given.folds, given.epochs, given.epochs_planned]
        assert row["mean_iou_std"] == ("" if given.mean_iou_std is None else str(given.mean_iou_std))
        stats = [row[key] for key in ("diff_vs_reference", "ci_low", "ci_high", "p_value", "p_adjusted", "verdict")]
        assert stats == (["", "", "", "", "", "reference"] if c is None else
                         [str(c.mean_difference), str(c.ci_low), str(c.ci_high), str(c.p_value), str(c.p_adjusted),
                          c.verdict])


def test_markdown_table_is_sorted_and_formatted(board: dict[str, Path]) -> None:
    lines = board["md"].read_text(encoding="utf-8").splitlines()
    header = next(line for line in lines if line.startswith("| name"))
    assert header == ("| name | decoder | loss | mean IoU | Dice | boundary F | pooled IoU | epochs | training (s) "
                      "| Δ IoU vs seed-cnn [95% CI] | p | p Holm | verdict |")
    rows = [line for line in lines if line.startswith("| ") and line != header]
    assert [row.split(" | ")[0][2:] for row in rows] == ["progressive", "loss=bce+dice,&lt;x>", "seed-cnn", "linear"]
    assert rows[0] == ("| progressive | progressive | bce | 0.7812 ± 0.0210 | 0.7312 | 0.2604 | 0.7612 | 20 | 250.0 "
                       "| +0.0131 [+0.0062, +0.0204] | 0.00012 | 0.00036 | better |")
    assert rows[2] == ("| seed-cnn | seed-cnn | bce | 0.7681 | 0.7181 | 0.2560 | 0.7481 | 20 | 250.0 "
                       "| — | — | — | reference |")
    assert rows[3] == ("| linear | linear | bce | 0.6291 | 0.5791 | 0.2097 | 0.6091 | 12 of 20 | 150.0 "
                       "| -0.0123 [-0.0310, +0.0050] | 0.041 | 0.082 | no detectable difference (n=40) |")
    assert "| loss=bce+dice,&lt;x> |  | bce+dice |" in rows[1]  # no decoder field: empty cell
    assert [f"- {note}" for note in NOTES] == [line for line in lines if line.startswith("- ")]
    assert lines[-1] == "![validation IoU per epoch](val_iou_curves.png)"


def html_rows(page: str) -> list[tuple[str, dict[str, str]]]:
    """(name, {data-column: data-value}) per table row."""
    body = re.search(r"<tbody>(.*)</tbody>", page, re.S).group(1)
    return [(html.unescape(re.match(r"<td[^>]*>([^<]*)</td>", row).group(1)),
             dict(re.findall(r'data-column="(\w+)" data-value="([^"]*)"', row)))
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def test_html_is_self_contained_escaped_and_agrees_with_the_csv(board: dict[str, Path]) -> None:
    page = board["html"].read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert not re.search(r'(?:src|href)\s*=\s*"?(?:https?:)?//', page, re.I)
    assert page.count("<img ") == 1 and page.count('src="data:image/png;base64,') == 1
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(embedded) == board["png"].read_bytes()
    assert "loss=bce+dice,&lt;x&gt;" in page and "<x>" not in page
    assert all(f"<li>{html.escape(note)}</li>" in page for note in NOTES)
    rows = html_rows(page)
    assert [name for name, _ in rows] == ORDER
    for (name, shown), row in zip(rows, csv_rows(board)):
        assert shown and shown == {column: row[column] for column in shown}, name
    assert set(rows[0][1]) == {"mean_iou", "mean_dice", "boundary_f", "pooled_iou", "epochs", "train_seconds",
                               "diff_vs_reference", "p_value", "p_adjusted"}
    assert '<td class="verdict better">better</td>' in page and '<tr class="reference"><td>seed-cnn</td>' in page


def test_many_entries_stay_in_one_readable_figure(tmp_path: Path) -> None:
    many = [entry(f"decoder-{index:02d}-with-a-long-name", {"decoder": str(index)}, 0.5 + index / 100,
                  None if index == 0 else ENTRIES[1].comparison, epochs=20 - index % 3) for index in range(24)]
    paths = write_leaderboard(tmp_path, many, reference="decoder-00-with-a-long-name")
    assert Image.open(paths["png"]).size == (11 * DPI, int((1.0 + 0.2 * 24) * DPI))
    assert not [line for line in paths["md"].read_text(encoding="utf-8").splitlines() if line.startswith("- ")]


def test_config_fields_named_like_a_score_column_get_their_own_column(tmp_path: Path) -> None:
    planned = [entry("short", {"epochs": "10"}, 0.6, None, epochs=10),
               entry("long", {"epochs": "20"}, 0.7, ENTRIES[1].comparison)]
    paths = write_leaderboard(tmp_path, planned, reference="short")
    rows = csv_rows(paths)
    assert list(rows[0])[:3] == ["name", "config_epochs", "mean_iou"]
    assert [(row["config_epochs"], row["epochs"]) for row in rows] == [("20", "20"), ("10", "10")]
    assert "| name | config_epochs | mean IoU |" in paths["md"].read_text(encoding="utf-8")


@pytest.mark.parametrize(("entries", "reference", "message"), [
    ([], "seed-cnn", "no entries"),
    (ENTRIES, "missing", "'missing' is not an entry name"),
    ([ENTRIES[0], ENTRIES[0]], "seed-cnn", "unique"),
])
def test_bad_entries_are_refused(tmp_path: Path, entries: list[LeaderboardEntry], reference: str,
                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_leaderboard(tmp_path / "out", entries, reference=reference)
    assert not (tmp_path / "out").exists()


def test_leaderboard_renders_in_a_real_browser(board: dict[str, Path]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); browser check skipped")
    screenshot = board["html"].parent.parent / "screenshot.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={board['html'].parent.parent / 'chromium-profile'}", "--virtual-time-budget=10000",
         "--window-size=1400,1000", f"--screenshot={screenshot}", board["html"].as_uri()],
        capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (1000, 1400, 3)
    dark = (pixels.max(axis=2) < 100).mean()  # text, table borders, curves
    coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()  # verdict cells and the figure's curves
    assert 0.005 < dark < 0.5 and coloured > 0.001, (dark, coloured)
