"""Figures of a binary screening decision, with intervals that respect patients, in NumPy.

Images of one patient are not independent (same lungs, same day, often the same label), so
intervals resample patients, not images, and folds and halves never split a patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# The figures the model card shares are written once, in app.evaluation; re-exported here so that
# the report's code reads every figure from one module.
from app.evaluation import ECE_BINS as ECE_BINS
from app.evaluation import BoolArray as BoolArray
from app.evaluation import confusion as confusion
from app.evaluation import expected_calibration_error as expected_calibration_error
from app.evaluation import roc_auc as roc_auc
from app.evaluation import roc_curve as roc_curve
from app.evaluation import weighted_auc
from app.model.site_profile import FloatArray

IntArray = npt.NDArray[np.int64]

RATES = ("sensitivity", "specificity", "ppv", "npv")


def rates(counts: dict[str, int]) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV and NPV of confusion counts (None where undefined)."""

    def ratio(a: int, b: int) -> float | None:
        return a / (a + b) if a + b else None

    return {
        "sensitivity": ratio(counts["tp"], counts["fn"]),
        "specificity": ratio(counts["tn"], counts["fp"]),
        "ppv": ratio(counts["tp"], counts["fp"]),
        "npv": ratio(counts["tn"], counts["fn"]),
    }


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    n: int
    mean_predicted: float
    observed: float


def reliability(labels: BoolArray, p: FloatArray, n_bins: int = 10) -> list[ReliabilityBin]:
    """Observed frequency of the positive class against mean predicted probability, per bin."""
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            out.append(
                ReliabilityBin(
                    b / n_bins,
                    (b + 1) / n_bins,
                    int(mask.sum()),
                    float(p[mask].mean()),
                    float(labels[mask].mean()),
                )
            )
    return out


def binomial_lower_bound(successes: int, trials: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound: the p below which seeing `successes` or more of
    `trials` has probability under 1 - confidence (0 when there are no successes)."""
    if trials <= 0:
        raise ValueError("no trials")
    if successes <= 0:
        return 0.0
    alpha = 1.0 - confidence
    k = np.arange(successes, trials + 1, dtype=np.float64)
    log_choose = np.array(
        [math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) for i in k]
    )

    def upper_tail(p: float) -> float:  # P(X >= successes | p)
        log_terms = log_choose + k * math.log(p) + (trials - k) * math.log1p(-p)
        top = float(log_terms.max())
        return math.exp(top) * float(np.sum(np.exp(log_terms - top)))

    lo, hi = 0.0, successes / trials
    for _ in range(60):  # bisection: the tail rises with p
        mid = (lo + hi) / 2.0
        if upper_tail(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class MarginThreshold:
    threshold: float
    positives_called: int
    positives: int
    in_sample_sensitivity: float
    lower_bound: float
    met: bool  # whether any threshold reached the bound; if not, the lowest positive score


def threshold_with_margin(
    labels: BoolArray, scores: FloatArray, target_sensitivity: float, confidence: float
) -> MarginThreshold:
    """The highest threshold whose sensitivity has a one-sided Clopper-Pearson lower bound (at
    `confidence`) of at least `target_sensitivity`: of the operating points that hold the target
    on new patients with that confidence, the most specific one.

    Where no count of positives reaches the bound (too few positives), the threshold is the lowest
    positive score (every positive called) and `met` is False.
    """
    positives = np.sort(scores[labels])[::-1]
    n = len(positives)
    if n == 0:
        raise ValueError("no positive cases to choose a threshold on")
    # the bound rises with the count called, so the smallest count that reaches it is wanted
    lo, hi = 1, n
    if binomial_lower_bound(n, n, confidence) < target_sensitivity:
        k, met = n, False
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if binomial_lower_bound(mid, n, confidence) >= target_sensitivity:
                hi = mid
            else:
                lo = mid + 1
        k, met = lo, True
    threshold = float(positives[k - 1])
    called = int(np.sum(positives >= threshold))  # ties at the threshold are called too
    return MarginThreshold(
        threshold, called, n, called / n, binomial_lower_bound(called, n, confidence), met
    )


def patient_index(keys: Sequence[str]) -> tuple[IntArray, int]:
    """Each image's patient as an index 0..P-1 (in sorted key order), and P."""
    unique = sorted(set(keys))
    position = {key: i for i, key in enumerate(unique)}
    return np.array([position[key] for key in keys], dtype=np.int64), len(unique)


def patient_bootstrap_weights(
    patients: IntArray, n_patients: int, resamples: int, seed: int
) -> FloatArray:
    """Per-image weights (resamples x images): how often each image's patient was drawn when
    `n_patients` patients are drawn with replacement, once per resample."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=resamples)
    weights: FloatArray = draws[:, patients].astype(np.float64)
    return weights


def bootstrap_rates(
    labels: BoolArray, called: BoolArray, weights: FloatArray, level: float = 0.95
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of sensitivity, specificity, PPV and NPV over patient resamples."""
    cells = {
        "tp": called & labels,
        "fp": called & ~labels,
        "tn": ~called & ~labels,
        "fn": ~called & labels,
    }
    sums = {name: weights @ mask.astype(np.float64) for name, mask in cells.items()}
    pairs = {
        "sensitivity": ("tp", "fn"),
        "specificity": ("tn", "fp"),
        "ppv": ("tp", "fp"),
        "npv": ("tn", "fn"),
    }
    out: dict[str, tuple[float, float] | None] = {}
    for name, (hit, miss) in pairs.items():
        denominator = sums[hit] + sums[miss]
        valid = denominator > 0
        if valid.sum() < 0.5 * len(denominator):
            out[name] = None
            continue
        values = sums[hit][valid] / denominator[valid]
        out[name] = _percentiles(values, level)
    return out


def bootstrap_auc(
    labels: BoolArray, scores: FloatArray, weights: FloatArray, level: float = 0.95
) -> tuple[float, float] | None:
    values = weighted_auc(labels, scores, weights)
    values = values[np.isfinite(values)]
    return _percentiles(values, level) if len(values) else None


def _percentiles(values: FloatArray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def patient_folds(
    patients: IntArray, n_patients: int, labels: BoolArray, k: int, seed: int
) -> IntArray:
    """A fold number 0..k-1 per image: patients dealt into k folds at random, positive patients
    (any positive image) and negative patients dealt separately so that every fold has both."""
    rng = np.random.default_rng(seed)
    positive_patient = np.zeros(n_patients, dtype=bool)
    positive_patient[patients[labels]] = True
    fold_of_patient = np.empty(n_patients, dtype=np.int64)
    offset = 0
    for group in (np.flatnonzero(positive_patient), np.flatnonzero(~positive_patient)):
        shuffled = rng.permutation(group)
        fold_of_patient[shuffled] = (np.arange(len(shuffled)) + offset) % k
        offset += len(shuffled)
    folds: IntArray = fold_of_patient[patients]
    return folds
