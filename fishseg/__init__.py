"""fishseg: fish segmentation from frozen, cached self-supervised features.

Every command is a function here: ``fishseg.extract``, ``train``, ``evaluate``, ``sweep``, ``compare``,
``probe``, ``predict``, ``demo``, each taking keywords named as the CLI's options and returning a typed result.
"""

from fishseg.api import SweepDeclined, compare, demo, evaluate, extract, predict, probe, sweep, train
from fishseg.config import ExtractConfig, TrainConfig
from fishseg.errors import FishsegError
from fishseg.results import (CrossValidationResult, EvaluationResult, ExtractResult, PredictionResult, ProbeResult,
                             TrainResult)
from fishseg.version import __version__

__all__ = [
    "extract", "train", "evaluate", "sweep", "compare", "probe", "predict", "demo",
    "ExtractConfig", "TrainConfig",
    "ExtractResult", "TrainResult", "CrossValidationResult", "EvaluationResult", "ProbeResult", "PredictionResult",
    "SweepResult", "Leaderboard", "SweepDeclined", "FishsegError", "__version__",
]


def __getattr__(name: str) -> object:
    """``SweepResult`` and ``Leaderboard``, imported when first asked for (their modules load matplotlib)."""
    if name == "SweepResult":
        from fishseg.training.sweep import SweepResult

        return SweepResult
    if name == "Leaderboard":
        from fishseg.evaluation.compare import Leaderboard

        return Leaderboard
    raise AttributeError(f"module 'fishseg' has no attribute {name!r}")
