"""notebooks/quickstart.ipynb runs top to bottom, as Jupyter runs it, so that it cannot rot.

The notebook is executed from a copy in its own folder (the working directory Jupyter gives a notebook),
so its relative output folder lands beside the copy and the repository stays untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed: no python3 kernel to run the notebook")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
OUTPUT = "quickstart-output"  # the folder the notebook writes into, beside itself (covered by .gitignore)
CELL_TIMEOUT_S = 600  # per cell; the whole notebook takes about a minute on 2 idle cores
EXPECTED_FILES = (
    "cache.h5",
    "runs/linear/run.json",
    "runs/seed-cnn/run.json",
    "runs/linear/report/report.html",
    "runs/seed-cnn/report/gallery_3_worst.png",
    "compare/leaderboard.md",
    "compare/val_iou_curves.png",
    "overlay.png",
)


def _outputs(notebook: nbformat.NotebookNode, output_type: str) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if output.output_type == output_type]


def test_notebook_is_stored_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_gitignore_covers_the_notebook_output() -> None:
    assert f"notebooks/{OUTPUT}/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, Path]:
    """The notebook run top to bottom from a copy in its own folder, and that folder."""
    folder = tmp_path_factory.mktemp("notebooks")
    shutil.copy(NOTEBOOK, folder)
    notebook = nbformat.read(folder / NOTEBOOK.name, as_version=4)
    with pytest.MonkeyPatch.context() as patch:  # the kernel imports this checkout's fishseg, installed or not
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}}).execute()
    return notebook, folder


@pytest.mark.slow  # a minute: the whole pipeline in a fresh kernel
def test_notebook_runs_top_to_bottom_and_writes_its_folder(executed: tuple[nbformat.NotebookNode, Path]) -> None:
    """Needs the public API (fishseg.extract/train/evaluate/compare, fishseg.Segmenter) of issue 20."""
    notebook, folder = executed
    assert not _outputs(notebook, "error")
    missing = [name for name in EXPECTED_FILES if not (folder / OUTPUT / name).is_file()]
    assert not missing, f"the notebook did not write {missing}"
    assert {path.name for path in folder.iterdir()} == {NOTEBOOK.name, OUTPUT}  # nothing outside its folder


@pytest.mark.slow
def test_notebook_says_its_backbone_is_random_init_and_shows_figures(
        executed: tuple[nbformat.NotebookNode, Path]) -> None:
    """Needs the public API of issue 20, like the test above."""
    notebook, _ = executed
    printed = "".join(output.text for output in _outputs(notebook, "stream"))
    assert "RANDOM-INIT" in printed and "reference" in printed  # the backbone named; the verdicts listed
    assert "IProgress not found" not in printed  # tqdm's notice without ipywidgets, silenced in the first cell
    images = [output for output in _outputs(notebook, "display_data") if "image/png" in output.data]
    assert len(images) >= 5  # the compare curves, three report figures, the overlay
