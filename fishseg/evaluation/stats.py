"""Paired comparison of per-image scores: is a run really better than the reference?

Every run is scored on the same validation images, so each image gives one paired difference
(entry − reference); pairing cancels the spread between easy and hard photos, which is far larger than
the differences between decoders, so the bootstrap interval and the Wilcoxon test use the differences
alone. Several entries checked against one reference form a family: Holm–Bonferroni keeps the chance of
any false "better" at ``alpha`` (with more power than plain Bonferroni).

Cross-validation entries are means of fold means (as ``cv.json`` says); with ``groups`` (each image's fold)
the mean difference is taken on the same basis, the mean over folds of each fold's mean difference, and the
bootstrap resamples images within their fold, so Δ is exactly the difference of the shown means even when the
folds differ in size.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import wilcoxon

BOOTSTRAP_BLOCK = 1000  # resamples drawn per index matrix: bounds memory at 1000×n indices for large n


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """One entry against the reference, over the images both were scored on."""

    n: int  # images paired
    mean_difference: float  # mean over images of (entry − reference); with groups, the mean of group means
    ci_low: float  # 95% paired bootstrap percentile interval of the mean difference
    ci_high: float
    p_value: float  # two-sided Wilcoxon signed-rank; 1.0 when every difference is 0
    p_adjusted: float  # Holm–Bonferroni over the family of comparisons made together
    verdict: str  # "better" | "worse" | "no detectable difference (n=…)"


def paired_bootstrap_ci(differences: np.ndarray, *, groups: np.ndarray | None = None, confidence: float = 0.95,
                        resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (n per-image differences), or with
    ``groups`` (n labels) of the mean of group means.

    Images are resampled with replacement (within their group), ``resamples`` times; the draws depend only
    on ``seed``, ``resamples`` and the group sizes, so the same inputs give the same interval.
    """
    differences = _as_differences(differences)
    rng, members = np.random.default_rng(seed), _members(groups, len(differences))
    blocks = [min(BOOTSTRAP_BLOCK, resamples - start) for start in range(0, resamples, BOOTSTRAP_BLOCK)]
    means = np.concatenate([
        np.mean([differences[group][rng.integers(0, len(group), size=(rows, len(group)))].mean(axis=1)
                 for group in members], axis=0) for rows in blocks])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of n paired differences (zeros dropped, scipy's default).

    1.0 where no difference is detectable: every difference 0, or a sample scipy cannot test
    (it returns nan there, and older versions warn).
    """
    differences = _as_differences(differences)
    if not differences.any():
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)  # "sample size too small" in older scipy
        p = float(wilcoxon(differences).pvalue)
    return 1.0 if math.isnan(p) else p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given (the k-th smallest is multiplied by m − k + 1,
    then made non-decreasing and capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(scaled, 1.0)
    return adjusted.tolist()


def compare_to_reference(scores: Mapping[str, np.ndarray], reference: str, *, groups: np.ndarray | None = None,
                         alpha: float = 0.05, resamples: int = 10_000, seed: int = 0) -> dict[str, PairedComparison]:
    """Compare every entry of ``scores`` (name → per-image scores, all aligned on the same n images)
    with ``scores[reference]``; Holm is applied over the entries other than the reference. ``groups``: each
    image's cross-validation fold, when the entries' means are means of fold means.

    Returns name → comparison for every entry but the reference, in the order of ``scores``.
    """
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the entries {sorted(scores)}")
    lengths = {name: len(values) for name, values in scores.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-image scores must cover the same images; lengths differ: {lengths}")
    base = np.asarray(scores[reference], dtype=np.float64)
    differences = {name: np.asarray(values, dtype=np.float64) - base
                   for name, values in scores.items() if name != reference}
    intervals = {name: paired_bootstrap_ci(d, groups=groups, resamples=resamples, seed=seed)
                 for name, d in differences.items()}
    p_values = {name: wilcoxon_p(d) for name, d in differences.items()}
    adjusted = dict(zip(differences, holm(list(p_values.values()))))
    members = _members(groups, len(base))
    return {name: _comparison(d, members, intervals[name], p_values[name], adjusted[name], alpha)
            for name, d in differences.items()}


def _members(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    """The image positions of each group, in the order of first appearance (one group of all n without
    ``groups``)."""
    if groups is None:
        return [np.arange(n)]
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"expected one group label per difference ({n}), got shape {groups.shape}")
    _, first = np.unique(groups, return_index=True)
    return [np.flatnonzero(groups == groups[index]) for index in sorted(first)]


def _comparison(differences: np.ndarray, members: list[np.ndarray], interval: tuple[float, float], p_value: float,
                p_adjusted: float, alpha: float) -> PairedComparison:
    low, high = interval
    if low > 0 and p_adjusted < alpha:
        verdict = "better"
    elif high < 0 and p_adjusted < alpha:
        verdict = "worse"
    else:
        verdict = f"no detectable difference (n={len(differences)})"
    mean = float(np.mean([differences[group].mean() for group in members]))
    return PairedComparison(len(differences), mean, low, high, p_value, p_adjusted, verdict)


def _as_differences(differences: np.ndarray) -> np.ndarray:
    """A non-empty, finite 1-d float64 array, or ValueError."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.ndim != 1 or len(differences) == 0 or not np.isfinite(differences).all():
        raise ValueError(f"expected a non-empty 1-d array of finite differences, got shape {differences.shape}")
    return differences
