from __future__ import annotations

import warnings

import numpy as np
import pytest

from fishseg.evaluation.stats import PairedComparison, compare_to_reference, holm, paired_bootstrap_ci, wilcoxon_p

N_IMAGES = 40


def reference_scores(seed: int = 0) -> np.ndarray:
    """Per-image IoU of a reference run: 40 validation images, U(0.5, 0.9)."""
    return np.random.default_rng(seed).uniform(0.5, 0.9, N_IMAGES)


def centred_noise(scale: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, scale, N_IMAGES)
    return noise - noise.mean()


@pytest.mark.parametrize(("shift", "verdict"), [(0.05, "better"), (-0.05, "worse")])
def test_a_planted_per_image_shift_is_detected(shift: float, verdict: str) -> None:
    reference = reference_scores()
    entry = reference + shift + centred_noise(0.01, seed=1)
    result = compare_to_reference({"ref": reference, "entry": entry}, "ref")["entry"]
    assert result.n == N_IMAGES
    assert result.mean_difference == pytest.approx(shift)
    assert result.ci_low < shift < result.ci_high and not result.ci_low <= 0 <= result.ci_high
    assert result.p_value < 1e-6 and result.p_adjusted == result.p_value  # a family of one
    assert result.verdict == verdict


def test_an_entry_identical_to_the_reference_shows_no_difference() -> None:
    reference = reference_scores()
    result = compare_to_reference({"ref": reference, "same": reference.copy()}, "ref")["same"]
    assert result == PairedComparison(N_IMAGES, 0.0, 0.0, 0.0, 1.0, 1.0, "no detectable difference (n=40)")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pure_noise_of_mean_zero_is_no_detectable_difference(seed: int) -> None:
    reference = reference_scores()
    result = compare_to_reference({"ref": reference, "noisy": reference + centred_noise(0.05, seed)}, "ref")["noisy"]
    assert result.mean_difference == pytest.approx(0, abs=1e-12)
    assert result.ci_low < 0 < result.ci_high and result.p_value > 0.2
    assert result.verdict == "no detectable difference (n=40)"


def test_bootstrap_interval_matches_the_normal_interval_of_a_mean() -> None:
    values = np.random.default_rng(0).normal(1, 1, 2000)
    low, high = paired_bootstrap_ci(values)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # ≈ 1.96/√2000 = 0.0438
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.002)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.05)
    assert low < 1 < high


def test_bootstrap_is_seeded_and_deterministic() -> None:
    values = np.random.default_rng(0).normal(0, 1, 30)
    first = paired_bootstrap_ci(values, resamples=2500, seed=7)  # not a multiple of the block size
    assert paired_bootstrap_ci(values, resamples=2500, seed=7) == first
    assert paired_bootstrap_ci(values, resamples=2500, seed=8) != first
    assert paired_bootstrap_ci(values, confidence=0.5, seed=7)[0] > first[0]  # narrower at 50%


@pytest.mark.parametrize(("p_values", "adjusted"), [
    ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),  # sorted 0.01, 0.03, 0.04 × 3, 2, 1 → 0.03, 0.06, 0.04 → running max
    ([0.2, 0.6, 0.9], [0.6, 1.0, 1.0]),  # 0.6 × 2 = 1.2 is capped at 1
    ([0.04], [0.04]),
    ([], []),
])
def test_holm_on_hand_worked_examples(p_values: list[float], adjusted: list[float]) -> None:
    assert holm(p_values) == pytest.approx(adjusted)


def test_holm_keeps_a_borderline_result_in_a_family_of_many_from_being_called_better() -> None:
    reference = reference_scores()
    borderline = reference + 0.007 + np.random.default_rng(1).normal(0, 0.02, N_IMAGES)
    alone = compare_to_reference({"ref": reference, "borderline": borderline}, "ref")["borderline"]
    assert alone.verdict == "better" and 0.005 < alone.p_value < 0.01 and alone.ci_low > 0  # ×10 ≥ 0.05
    family = {"ref": reference, "borderline": borderline}
    family |= {f"noise-{seed}": reference + centred_noise(0.05, seed) for seed in range(1, 10)}
    results = compare_to_reference(family, "ref")
    assert list(results) == [name for name in family if name != "ref"]
    result = results["borderline"]
    assert (result.p_value, result.ci_low, result.ci_high) == (alone.p_value, alone.ci_low, alone.ci_high)
    assert result.p_adjusted == pytest.approx(10 * alone.p_value)  # the smallest p of 10 is multiplied by 10
    assert result.verdict == "no detectable difference (n=40)"


@pytest.mark.parametrize(("reference", "entry", "p_value"), [
    ([0.5], [0.7], 1.0),  # n = 1: a difference, but nothing to test it against
    ([0.5], [0.5], 1.0),
    ([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], 1.0),  # all zero: scipy would warn and return nan
    ([0.5, 0.6, 0.7], [0.6, 0.7, 0.8], 0.25),  # three equal positive differences: exact p = 2 / 2³
])
def test_degenerate_samples_give_no_warning(reference: list[float], entry: list[float], p_value: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compare_to_reference({"ref": np.array(reference), "entry": np.array(entry)}, "ref")["entry"]
        assert wilcoxon_p(np.array(entry) - np.array(reference)) == result.p_value
    assert result.p_value == pytest.approx(p_value)
    assert result.verdict == f"no detectable difference (n={len(reference)})"


def test_mismatched_lengths_unknown_reference_and_bad_values_raise() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        compare_to_reference({"ref": np.zeros(40), "short": np.zeros(39)}, "ref")
    with pytest.raises(ValueError, match="'other' is not among"):
        compare_to_reference({"ref": np.zeros(40)}, "other")
    with pytest.raises(ValueError, match="finite"):
        compare_to_reference({"ref": np.zeros(3), "entry": np.array([0.1, np.nan, 0.2])}, "ref")


def test_with_folds_the_difference_is_the_mean_of_fold_means() -> None:
    rng = np.random.default_rng(3)
    reference = rng.uniform(0.4, 0.9, 10)
    entry = reference + np.r_[np.full(2, 0.10), np.full(8, 0.01)] + rng.normal(0, 0.005, 10)  # folds of 2 and 8
    groups = np.r_[np.zeros(2, int), np.ones(8, int)]
    differences = entry - reference
    pooled = compare_to_reference({"ref": reference, "entry": entry}, "ref")["entry"]
    folded = compare_to_reference({"ref": reference, "entry": entry}, "ref", groups=groups)["entry"]
    assert pooled.mean_difference == pytest.approx(differences.mean(), abs=1e-15)  # over images (about 0.028)
    by_folds = (differences[:2].mean() + differences[2:].mean()) / 2  # as the entries' means of fold means (0.055)
    assert folded.mean_difference == pytest.approx(by_folds, abs=1e-15) and abs(by_folds - differences.mean()) > 0.02
    assert folded.ci_low < by_folds < folded.ci_high and folded.n == 10
    assert paired_bootstrap_ci(differences, groups=np.zeros(10)) == paired_bootstrap_ci(differences)
