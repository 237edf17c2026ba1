"""fishseg: fish segmentation from frozen, cached self-supervised features.

Every command is a function here: ``fishseg.extract``, ``train``, ``evaluate``, ``sweep``, ``compare``,
``probe``, ``predict``, ``demo``, each taking keywords named as the CLI's options and returning a typed result.
"""

__version__ = "0.1.0"

from fishseg.api import (SweepDeclined, compare, demo, evaluate, extract, predict,  # noqa: E402 (after the version)
                         probe, sweep, train)
from fishseg.config import ExtractConfig, TrainConfig  # noqa: E402
from fishseg.errors import FishsegError  # noqa: E402
from fishseg.results import (CrossValidationResult, EvaluationResult, ExtractResult,  # noqa: E402
                             PredictionResult, ProbeResult, TrainResult)

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
