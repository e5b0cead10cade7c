"""Maximum-likelihood recalibration on the logit of the served probability, in NumPy.

Platt scaling fits p' = sigmoid(a * z + b), z = logit(p), by Newton's method on the Bernoulli log
likelihood (which is iteratively reweighted least squares for this model), with step halving so
that every accepted step lowers the loss. Temperature scaling fits the slope alone (b = 0,
a = 1 / T). Two free parameters need both classes in some number: below `MIN_PER_CLASS_FOR_PLATT`
cases of the rarer class the intercept is poorly determined, so the fit falls back to temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.model.site_profile import FloatArray, logit

# With two parameters, about ten events per parameter is the usual floor for a logistic fit that
# does not overfit; we ask for 30 of the rarer class so that the intercept is estimated to within
# a few tenths on the logit.
MIN_PER_CLASS_FOR_PLATT = 30
MAX_NEWTON_STEPS = 100
MAX_HALVINGS = 40
TOLERANCE = 1e-10


class FitError(ValueError):
    """The data cannot be recalibrated (one class absent, or no finite solution)."""


@dataclass(frozen=True)
class Fit:
    method: str  # "platt" | "temperature"
    slope: float
    intercept: float
    reason: str
    iterations: int
    log_loss_before: float
    log_loss_after: float

    def apply(self, p: FloatArray) -> FloatArray:
        from app.model.site_profile import recalibrate

        return recalibrate(np.asarray(p, dtype=np.float64), self.slope, self.intercept)


def log_loss(labels: FloatArray, p: FloatArray) -> float:
    """Mean negative log likelihood of binary `labels` under probabilities `p`."""
    z = logit(p)
    return _mean_nll(np.asarray(labels, dtype=np.float64), z)


def _mean_nll(y: FloatArray, eta: FloatArray) -> float:
    # log(1 + exp(eta)) - y * eta, computed without overflow
    return float(np.mean(np.logaddexp(0.0, eta) - y * eta))


def _newton(
    z: FloatArray, y: FloatArray, with_intercept: bool, start: FloatArray
) -> tuple[FloatArray, int]:
    design = np.column_stack([z, np.ones_like(z)]) if with_intercept else z[:, None]
    theta = start.copy()
    loss = _mean_nll(y, design @ theta)
    for iteration in range(1, MAX_NEWTON_STEPS + 1):
        eta = design @ theta
        mu = 1.0 / (1.0 + np.exp(-eta))
        gradient = design.T @ (mu - y) / len(y)
        weights = mu * (1.0 - mu)
        hessian = (design * weights[:, None]).T @ design / len(y)
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError as exc:
            raise FitError("the logistic fit is singular (all scores equal?)") from exc
        scale = 1.0
        for _ in range(MAX_HALVINGS):
            candidate = theta - scale * step
            candidate_loss = _mean_nll(y, design @ candidate)
            if candidate_loss <= loss:
                break
            scale /= 2.0
        else:
            return theta, iteration  # no descent direction left: at the optimum to rounding
        improvement = loss - candidate_loss
        theta, loss = candidate, candidate_loss
        if improvement < TOLERANCE and float(np.max(np.abs(scale * step))) < 1e-8:
            return theta, iteration
    raise FitError(
        f"the logistic fit did not converge in {MAX_NEWTON_STEPS} Newton steps (are the classes "
        "perfectly separated by the score?)"
    )


def fit_platt(p: FloatArray, labels: FloatArray) -> Fit:
    """Two-parameter logistic recalibration by maximum likelihood (Newton / IRLS)."""
    z, y = _checked(p, labels)
    theta, iterations = _newton(z, y, True, np.array([1.0, 0.0]))
    slope, intercept = float(theta[0]), float(theta[1])
    _check_solution(slope, intercept)
    return Fit(
        "platt",
        slope,
        intercept,
        "two-parameter logistic on the logit (Platt), maximum likelihood by Newton/IRLS",
        iterations,
        _mean_nll(y, z),
        _mean_nll(y, slope * z + intercept),
    )


def fit_temperature(p: FloatArray, labels: FloatArray, reason: str | None = None) -> Fit:
    """Slope-only recalibration (temperature scaling, T = 1 / slope) by maximum likelihood.

    The targets are Platt's: (N+ + 1) / (N+ + 2) for a positive and 1 / (N- + 2) for a negative
    rather than 1 and 0, so that a few perfectly separated cases still give a finite slope (the
    unsmoothed likelihood then has no maximum); with many cases the difference vanishes.
    """
    z, y = _checked(p, labels)
    positives, negatives = y.sum(), len(y) - y.sum()
    targets = np.where(y == 1.0, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    theta, iterations = _newton(z, targets, False, np.array([1.0]))
    slope = float(theta[0])
    _check_solution(slope, 0.0)
    return Fit(
        "temperature",
        slope,
        0.0,
        reason
        or "temperature scaling (slope only), maximum likelihood by Newton on Platt's "
        "smoothed targets",
        iterations,
        _mean_nll(y, z),
        _mean_nll(y, slope * z),
    )


def fit_recalibration(p: FloatArray, labels: FloatArray) -> Fit:
    """Platt when both classes have at least `MIN_PER_CLASS_FOR_PLATT` cases, else temperature."""
    y = np.asarray(labels, dtype=np.float64)
    rarer = int(min(y.sum(), len(y) - y.sum()))
    if rarer < MIN_PER_CLASS_FOR_PLATT:
        return fit_temperature(
            p,
            labels,
            reason=f"temperature scaling (slope only): the rarer class has {rarer} cases, fewer "
            f"than the {MIN_PER_CLASS_FOR_PLATT} a two-parameter (Platt) fit needs to estimate "
            "its intercept reliably",
        )
    try:
        fit = fit_platt(p, labels)
    except FitError as exc:
        return fit_temperature(
            p, labels, reason=f"temperature scaling (slope only): the Platt fit failed ({exc})"
        )
    return Fit(
        fit.method,
        fit.slope,
        fit.intercept,
        f"two-parameter logistic on the logit (Platt), maximum likelihood by Newton/IRLS: "
        f"both classes have at least {MIN_PER_CLASS_FOR_PLATT} cases (rarer class: {rarer})",
        fit.iterations,
        fit.log_loss_before,
        fit.log_loss_after,
    )


def _checked(p: FloatArray, labels: FloatArray) -> tuple[FloatArray, FloatArray]:
    z = logit(p)
    y = np.asarray(labels, dtype=np.float64)
    if z.shape != y.shape or z.ndim != 1:
        raise FitError("probabilities and labels must be two vectors of the same length")
    if not np.all((y == 0.0) | (y == 1.0)):
        raise FitError("labels must be 0 or 1")
    if y.sum() == 0 or y.sum() == len(y):
        raise FitError("recalibration needs cases of both classes")
    return z, y


def _check_solution(slope: float, intercept: float) -> None:
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise FitError("the logistic fit did not converge to finite parameters")
    if slope <= 0.0:
        raise FitError(
            f"the fitted slope is {slope:.3g}: on these data higher model scores do not mean "
            "more pneumonia, so no recalibration of this model can be trusted here"
        )
