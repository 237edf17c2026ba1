"""The result types the public API returns: documented for help(), and a repr short enough to read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import fishseg
from fishseg.formats.runs import RunFolder
from fishseg.results import EvaluationResult, TrainResult

RESULT_TYPES = ("ExtractResult", "TrainResult", "CrossValidationResult", "EvaluationResult", "ProbeResult",
                "PredictionResult", "ExportResult", "SweepResult", "Leaderboard")


@pytest.mark.parametrize("name", RESULT_TYPES)
def test_every_result_type_says_which_call_returns_it_and_what_each_field_means(name: str) -> None:
    result_type = getattr(fishseg, name)
    doc = result_type.__doc__ or ""
    assert "fishseg." in doc.split("\n")[0], doc
    assert "export_onnx" not in doc
    for field in dataclasses.fields(result_type):
        assert f"``{field.name}``" in doc, (name, field.name)


def test_a_real_results_repr_is_short_and_leaves_the_big_fields_out(evaluated: tuple[Path, Path, dict]) -> None:
    _, run_dir, metrics = evaluated
    evaluation = EvaluationResult.of(run_dir.parent / "report", run_dir.parent / "report" / "report.html", metrics)
    trained = TrainResult.of(run_dir, RunFolder(run_dir).read_record())
    for result in (evaluation, trained):
        text = repr(result)
        assert len(text) < 400 and "metrics=" not in text and "record=" not in text, text
    assert f"mean_iou={metrics['mean_iou']!r}" in repr(evaluation)
    assert f"best_epoch={trained.best_epoch}" in repr(trained)


def test_the_segmenters_own_docstring_says_what_it_takes_and_returns() -> None:
    doc = fishseg.Segmenter.__doc__ or ""
    for essential in ("from_run", "PIL image", "H×W×3 uint8", "result.mask", "result.probabilities", "batch_size"):
        assert essential in doc, essential
    assert "module's docstring" not in doc
