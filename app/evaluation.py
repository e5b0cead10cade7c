"""The evaluation arithmetic that training and the site tool share, written once.

The model card's figures (training) and a site's report (`app.site_validation`) are compared with
each other: a site reads its ECE beside the card's. Both therefore take the confusion counts, the
ROC curve and its area, the calibration error and the patient ids of Kermany file names from here.
It is arithmetic on labels and scores, never on pixels, so sharing it cannot hide a preprocessing
bug on both sides of the train/serve parity test (`tests/training/test_boundaries.py` allows
training this module and the contract only)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Equal-width bins of p(positive), the model card's ECE and the acceptance figures' (15).
ECE_BINS = 15

# Kermany file names carry the patient: "person1_bacteria_1.jpeg", "IM-0115-0001.jpeg",
# "NORMAL2-IM-0123-0001.jpeg". Splits, folds and bootstrap intervals group images by it, so that
# no patient's images land on both sides of a split.
KERMANY_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
)


def kermany_patient(name: str) -> str | None:
    """The patient id in a Kermany file name, or None when the name follows none of them."""
    for pattern in KERMANY_PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def linked_groups(keys: Sequence[Iterable[str]]) -> list[int]:
    """Items linked through any key they share (a patient id, an image digest), transitively:
    for each item, the index of the first item of its group. Splits, halves, folds and bootstrap
    intervals group by this, so that neither a patient nor a byte-identical image filed under two
    patients ends up on both sides."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, item_keys in enumerate(keys):
        for key in item_keys:
            j = first_with.setdefault(key, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root stays the group's first item
    return [root(i) for i in range(len(keys))]


def confusion(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> dict[str, int]:
    """Counts of the decision `score >= threshold` against the labels (truthy = positive)."""
    positive = np.asarray(labels).astype(bool)
    called = np.asarray(scores) >= threshold
    return {
        "tn": int(np.sum(~called & ~positive)),
        "fp": int(np.sum(called & ~positive)),
        "fn": int(np.sum(~called & positive)),
        "tp": int(np.sum(called & positive)),
    }


def roc_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(false positive rate, true positive rate, threshold) at every distinct score, from the
    highest threshold down: the first point is (0, 0) at +inf, the last (1, 1) at the lowest
    score."""
    s_all = np.asarray(scores, dtype=np.float64)
    y_all = np.asarray(labels).astype(bool)
    order = np.argsort(-s_all, kind="mergesort")
    s, y = s_all[order], y_all[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / negatives]
    tpr = np.r_[0.0, tps / positives]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def roc_auc(
    labels: npt.ArrayLike, scores: npt.ArrayLike, weights: npt.ArrayLike | None = None
) -> float:
    """Area under the ROC curve, the Mann-Whitney statistic (ties count one half), optionally with
    per-image weights; NaN when a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(weighted_auc(np.asarray(labels).astype(bool), s, w[None, :])[0])


def weighted_auc(labels: BoolArray, scores: FloatArray, weights: FloatArray) -> FloatArray:
    """AUC for each row of `weights` (resamples x images): the weighted Mann-Whitney statistic,
    one sort for every row (the patient bootstrap's resamples are rows of weights)."""
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], weights[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # groups of tied scores
    w_pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    w_neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg  # negatives strictly below each group
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    wins = np.sum(w_pos * (below + 0.5 * w_neg), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc: FloatArray = np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)
    return auc


def expected_calibration_error(
    labels: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = ECE_BINS
) -> float:
    """ECE of the positive-class probability over equal-width bins (p = 1 in the last), each bin
    weighted by its share of the images."""
    y = np.asarray(labels).astype(np.float64)
    scores = np.asarray(p, dtype=np.float64)
    bins = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - scores[mask].mean())
    return float(total)
