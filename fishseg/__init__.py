"""fishseg: fish segmentation from frozen, cached self-supervised features.

Every command is a function here: ``fishseg.extract``, ``train``, ``evaluate``, ``sweep``, ``compare``,
``probe``, ``predict``, ``export``, ``demo``, each taking keywords named as the CLI's options and returning a typed
result; ``Segmenter`` turns photos into masks in memory.
"""

import importlib

from fishseg.api import SweepDeclined, compare, demo, evaluate, export, extract, predict, probe, sweep, train
from fishseg.config import ExtractConfig, TrainConfig
from fishseg.errors import FishsegError
from fishseg.results import (CrossValidationResult, EvaluationResult, ExtractResult, PredictionResult, ProbeResult,
                             TrainResult)
from fishseg.version import __version__

__all__ = [
    "extract", "train", "evaluate", "sweep", "compare", "probe", "predict", "export", "demo", "Segmenter",
    "Segmentation",
    "ExtractConfig", "TrainConfig",
    "ExtractResult", "TrainResult", "CrossValidationResult", "EvaluationResult", "ProbeResult", "PredictionResult",
    "ExportResult", "SweepResult", "Leaderboard", "SweepDeclined", "FishsegError", "__version__",
]


LAZY = {  # name → module: imported when first asked for (they load torch, transformers or matplotlib)
    "Segmenter": "fishseg.inference.segmenter", "Segmentation": "fishseg.inference.segmenter",
    "ExportResult": "fishseg.inference.export", "SweepResult": "fishseg.training.sweep",
    "Leaderboard": "fishseg.evaluation.compare",
}


def __getattr__(name: str) -> object:
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'fishseg' has no attribute {name!r}")
