"""Threshold with a margin, intervals by patient, folds by patient, AUC."""

from __future__ import annotations

import numpy as np
import pytest

from app.site_validation import metrics as m


def test_clopper_pearson_lower_bound_known_values() -> None:
    # all of n: the bound is (1 - confidence) ** (1 / n)
    assert m.binomial_lower_bound(10, 10, 0.95) == pytest.approx(0.05**0.1, abs=1e-9)
    assert m.binomial_lower_bound(0, 10, 0.95) == 0.0
    # 90 of 100 at one-sided 95%: the beta(90, 11) 5% quantile, 0.8359 (tables)
    assert m.binomial_lower_bound(90, 100, 0.95) == pytest.approx(0.8359, abs=5e-4)
    # the bound never exceeds the observed proportion and rises with confidence falling
    assert m.binomial_lower_bound(45, 50, 0.5) < 0.9
    assert m.binomial_lower_bound(45, 50, 0.8) < m.binomial_lower_bound(45, 50, 0.5)


def test_threshold_keeps_a_margin_above_the_target() -> None:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.random(200), rng.random(300) * 0.6]
    labels = np.r_[np.ones(200, bool), np.zeros(300, bool)]
    chosen = m.threshold_with_margin(labels, scores, 0.90, 0.95)
    assert chosen.met
    assert chosen.lower_bound >= 0.90
    assert chosen.in_sample_sensitivity > 0.92  # the margin: above the target itself
    # the most specific such threshold: one positive fewer called would break the bound
    assert m.binomial_lower_bound(chosen.positives_called - 1, 200, 0.95) < 0.90
    called = int(np.sum(scores[labels] >= chosen.threshold))
    assert called == chosen.positives_called
    # without a margin (confidence 0.5) the threshold is higher: fewer positives called
    plain = m.threshold_with_margin(labels, scores, 0.90, 0.5)
    assert plain.threshold > chosen.threshold


def test_threshold_with_too_few_positives_calls_every_positive() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    labels = np.array([True, True, True, False, False])
    chosen = m.threshold_with_margin(labels, scores, 0.95, 0.95)
    assert not chosen.met
    assert chosen.threshold == 0.7 and chosen.positives_called == 3


def test_bootstrap_resamples_patients_not_images() -> None:
    patients = np.array([0, 0, 0, 1, 2, 2], dtype=np.int64)
    weights = m.patient_bootstrap_weights(patients, 3, 500, seed=1)
    assert weights.shape == (500, 6)
    # the images of one patient are drawn together
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 1] == weights[:, 2])
    assert np.all(weights[:, 4] == weights[:, 5])
    # three patients are drawn per resample
    per_patient = weights[:, [0, 3, 4]]
    assert np.all(per_patient.sum(axis=1) == 3)


def test_patient_intervals_are_wider_when_one_patient_has_many_images() -> None:
    # 40 positive images: 20 of one patient, all missed; 20 single patients, all found
    labels = np.ones(40, bool)
    called = np.r_[np.zeros(20, bool), np.ones(20, bool)]
    clustered = np.r_[np.zeros(20, np.int64), np.arange(1, 21)]
    independent = np.arange(40, dtype=np.int64)
    w_clustered = m.patient_bootstrap_weights(clustered, 21, 2000, seed=0)
    w_independent = m.patient_bootstrap_weights(independent, 40, 2000, seed=0)
    lo_c, hi_c = m.bootstrap_rates(labels, called, w_clustered)["sensitivity"]  # type: ignore[misc]
    lo_i, hi_i = m.bootstrap_rates(labels, called, w_independent)["sensitivity"]  # type: ignore[misc]
    assert hi_c - lo_c > 2 * (hi_i - lo_i)
    assert lo_c < 0.35 and hi_c == 1.0  # the one patient drawn three times, or not at all


def test_weighted_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(80), 1)  # many ties
    labels = rng.random(80) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert m.roc_auc(labels, scores) == pytest.approx(pairwise, abs=1e-12)
    # integer weights are the same as repeating images
    weights = rng.integers(0, 3, 80).astype(float)
    repeated = np.repeat(np.arange(80), weights.astype(int))
    assert m.roc_auc(labels, scores, weights) == pytest.approx(
        m.roc_auc(labels[repeated], scores[repeated]), abs=1e-12
    )


def test_folds_never_split_a_patient_and_hold_both_classes() -> None:
    rng = np.random.default_rng(2)
    patients = rng.integers(0, 60, 300).astype(np.int64)
    positive_patient = np.arange(60) % 3 == 0
    labels = positive_patient[patients]
    folds = m.patient_folds(patients, 60, labels, 5, seed=0)
    for patient in np.unique(patients):
        assert len(set(folds[patients == patient].tolist())) == 1
    for f in range(5):
        assert labels[folds == f].any() and (~labels[folds == f]).any()


def test_ece_of_perfect_and_shifted_probabilities() -> None:
    p = np.full(1000, 0.3)
    labels = np.r_[np.ones(300, bool), np.zeros(700, bool)]
    assert m.expected_calibration_error(labels, p) == pytest.approx(0.0, abs=1e-12)
    assert m.expected_calibration_error(labels, np.full(1000, 0.5)) == pytest.approx(0.2)
