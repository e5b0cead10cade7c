"""Screening metrics, intervals, threshold choice and temperature scaling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.metrics import (
    evaluate_scores,
    expected_calibration_error,
    fit_temperature,
    point_metrics,
    positive_log_odds,
    positive_probabilities,
    roc_auc,
    select_threshold,
    softmax,
)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes ties
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_point_metrics_from_a_known_confusion_matrix() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1])
    m = point_metrics(y, s, 0.5)  # TP 3, FN 1, FP 1, TN 5
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)


def test_intervals_contain_the_point_and_widen_with_fewer_patients() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    s = np.clip(0.35 * y + rng.random(400) * 0.65, 0, 1)
    many = evaluate_scores(y, s, 0.5, n_bootstrap=300)
    few = evaluate_scores(y[:60], s[:60], 0.5, n_bootstrap=300)
    for k in ("accuracy", "roc_auc", "recall"):
        lo, hi = many[k]["ci95"]
        assert lo <= many[k]["value"] <= hi
        assert (few[k]["ci95"][1] - few[k]["ci95"][0]) > (hi - lo)
    assert many["confusion_matrix"]["tp"] + many["confusion_matrix"]["fn"] == int(y.sum())


def test_patient_clusters_widen_the_interval() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(rng.integers(0, 2, 50), 8)  # 50 patients, 8 correlated images each
    s = np.repeat(rng.random(50), 8) * 0.6 + 0.4 * y
    independent = evaluate_scores(y, s, 0.5, n_bootstrap=300)["accuracy"]["ci95"]
    clustered = evaluate_scores(
        y, s, 0.5, groups=np.repeat(np.arange(50), 8).astype(str), n_bootstrap=300
    )["accuracy"]["ci95"]
    assert clustered[1] - clustered[0] > 1.5 * (independent[1] - independent[0])


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_the_sensitivity_target_as_specifically_as_possible(target: float) -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    s = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1)
    t = select_threshold(y, s, target)
    assert (s[y == 1] >= t).mean() >= target
    # any higher threshold misses the target
    higher = np.min(s[s > t]) if (s > t).any() else None
    if higher is not None:
        assert (s[y == 1] >= higher).mean() < target


def test_temperature_recovers_an_overconfident_model() -> None:
    rng = np.random.default_rng(5)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = np.stack([np.zeros(4000), 3.0 * true_logit], axis=1)  # 3x overconfident
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(y, positive_probabilities(logits))
    after = expected_calibration_error(y, positive_probabilities(logits, t))
    assert after < before / 2


def test_softmax_rows_sum_to_one_for_extreme_logits() -> None:
    p = softmax(np.array([[1000.0, -1000.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert p[1, 0] == pytest.approx(0.5)


def test_the_positive_class_is_pneumonia_in_probabilities_and_log_odds() -> None:
    from training.data import CLASSES, POSITIVE, POSITIVE_CLASS

    assert CLASSES[POSITIVE] == POSITIVE_CLASS == "PNEUMONIA"
    logits = np.array([[0.0, 2.0], [1.5, -0.5], [3.0, 3.0]])
    np.testing.assert_array_equal(positive_log_odds(logits), [2.0, -2.0, 0.0])
    for temperature in (1.0, 2.5):
        np.testing.assert_allclose(
            positive_probabilities(logits, temperature),
            1.0 / (1.0 + np.exp(-positive_log_odds(logits) / temperature)),
        )
        np.testing.assert_array_equal(
            positive_probabilities(logits, temperature), softmax(logits, temperature)[:, 1]
        )


def test_the_model_cards_figures_are_the_site_reports_sums() -> None:
    """Training and the site tool share one implementation (`app.evaluation`): a site's ECE is
    comparable with the model card's because it is the same function."""
    from app import evaluation
    from app.site_validation import metrics as site
    from training import metrics

    for name in ("roc_auc", "roc_curve", "confusion", "expected_calibration_error"):
        assert getattr(metrics, name) is getattr(evaluation, name) is getattr(site, name), name
