"""Recalibration fits: Platt by Newton recovers known parameters; tiny data fall back to a
temperature; data that cannot be recalibrated are refused."""

from __future__ import annotations

import numpy as np
import pytest

from app.model.site_profile import logit, sigmoid
from app.site_validation.fitting import (
    MIN_PER_CLASS_FOR_PLATT,
    FitError,
    fit_platt,
    fit_recalibration,
    fit_temperature,
    log_loss,
)


def _synthetic(
    n: int, slope: float, intercept: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Served probabilities whose true recalibration is sigmoid(slope * logit + intercept)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    labels = (rng.random(n) < sigmoid(slope * z + intercept)).astype(float)
    return sigmoid(z), labels


@pytest.mark.parametrize(("slope", "intercept"), [(0.64, -2.5), (1.8, 0.7), (1.0, 0.0)])
def test_platt_recovers_known_parameters(slope: float, intercept: float) -> None:
    p, y = _synthetic(40_000, slope, intercept)
    fit = fit_platt(p, y)
    assert fit.method == "platt"
    assert fit.slope == pytest.approx(slope, abs=0.05)
    assert fit.intercept == pytest.approx(intercept, abs=0.07)
    assert fit.log_loss_after <= fit.log_loss_before
    assert fit.iterations < 30


def test_platt_is_the_maximum_of_the_likelihood() -> None:
    p, y = _synthetic(3_000, 0.7, -1.0, seed=3)
    fit = fit_platt(p, y)
    z = logit(p)
    mu = sigmoid(fit.slope * z + fit.intercept)
    # the score equations hold at the maximum likelihood estimate
    assert abs(np.mean((mu - y) * z)) < 1e-8
    assert abs(np.mean(mu - y)) < 1e-8
    best = log_loss(y, fit.apply(p))
    for ds, db in ((0.02, 0), (-0.02, 0), (0, 0.02), (0, -0.02)):
        nudged = sigmoid((fit.slope + ds) * z + fit.intercept + db)
        assert log_loss(y, nudged) > best


def test_tiny_data_fall_back_to_temperature() -> None:
    p, y = _synthetic(4_000, 0.5, 0.0, seed=1)
    few = np.r_[np.flatnonzero(y == 1)[:12], np.flatnonzero(y == 0)[:200]]
    fit = fit_recalibration(p[few], y[few])
    assert fit.method == "temperature"
    assert fit.intercept == 0.0
    assert f"fewer than the {MIN_PER_CLASS_FOR_PLATT}" in fit.reason
    assert "12 cases" in fit.reason
    # the slope still moves towards the truth (0.5) from the served 1.0
    assert 0.2 < fit.slope < 0.9


def test_enough_data_get_platt() -> None:
    p, y = _synthetic(2_000, 0.5, -0.5, seed=2)
    fit = fit_recalibration(p, y)
    assert fit.method == "platt"
    assert "Platt" in fit.reason


def test_perfectly_separated_tiny_data_get_a_finite_temperature() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1], dtype=float)
    # the unsmoothed likelihood has no maximum here: the slope would run off to infinity
    with pytest.raises(FitError):
        fit_platt(p, y)
    fit = fit_recalibration(p, y)
    assert fit.method == "temperature"
    # Platt's targets (3 + 1) / (3 + 2) = 0.8 and 1 / (3 + 2) = 0.2 keep the slope finite
    assert np.isfinite(fit.slope) and 0.5 < fit.slope < 1.5


def test_one_class_only_is_refused() -> None:
    with pytest.raises(FitError, match="both classes"):
        fit_temperature(np.array([0.2, 0.9, 0.7]), np.array([1.0, 1.0, 1.0]))


def test_scores_that_point_the_wrong_way_are_refused() -> None:
    p, y = _synthetic(2_000, -1.0, 0.0, seed=4)
    with pytest.raises(FitError, match="do not mean more pneumonia"):
        fit_platt(p, y)
