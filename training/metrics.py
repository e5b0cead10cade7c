"""Binary screening metrics with confidence intervals, threshold choice and temperature scaling.

Pure NumPy, so evaluation of an ONNX model needs no TensorFlow. Confidence intervals are percentile
bootstrap intervals that resample *patients* (several images of one patient are not independent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Written once for training and the site tool (a site compares its ECE with the model card's).
from app.evaluation import confusion as confusion
from app.evaluation import expected_calibration_error as expected_calibration_error
from app.evaluation import roc_auc as roc_auc
from app.evaluation import roc_curve as roc_curve
from training.data import POSITIVE

POINT_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def positive_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The positive class's probability per row of two-class logits, at `temperature`."""
    return softmax(logits, temperature)[:, POSITIVE]


def positive_log_odds(logits: np.ndarray) -> np.ndarray:
    """The positive class's logit minus the other's, per row: the log-odds of the positive class
    under the two-class softmax."""
    return logits[:, POSITIVE] - logits[:, 1 - POSITIVE]


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def point_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    c = confusion(y_true, scores, threshold)
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    recall = _ratio(c["tp"], c["tp"] + c["fn"])
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "f1": _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0,
        "roc_auc": roc_auc(y_true, scores),
    }


def evaluate_scores(
    y_true: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    groups: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, object]:
    """Every screening metric at `threshold`, each with a 95% patient-level bootstrap interval."""
    y_true = np.asarray(y_true).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    point = point_metrics(y_true, scores, threshold)
    groups_arr = np.asarray(groups if groups is not None else np.arange(len(y_true)).astype(str))
    unique, inverse = np.unique(groups_arr, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in POINT_METRICS}
    for _ in range(n_bootstrap):
        picked = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[g] for g in picked])
        m = point_metrics(y_true[idx], scores[idx], threshold)
        for k in POINT_METRICS:
            samples[k].append(m[k])
    result: dict[str, object] = {
        k: {
            "value": round(point[k], 4),
            "ci95": [
                round(float(np.nanpercentile(samples[k], 2.5)), 4),
                round(float(np.nanpercentile(samples[k], 97.5)), 4),
            ],
        }
        for k in POINT_METRICS
    }
    result["confusion_matrix"] = confusion(y_true, scores, threshold)
    result["threshold"] = round(float(threshold), 6)
    result["n"] = len(y_true)
    result["n_patients"] = len(unique)
    result["n_positive"] = int(y_true.sum())
    result["ece"] = round(expected_calibration_error(y_true, scores), 4)
    result["ci_method"] = f"percentile bootstrap over patients, {n_bootstrap} resamples"
    return result


def select_threshold(y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these data is still >= `target_sensitivity`.

    Highest, so that of all operating points meeting the sensitivity target we take the most
    specific one.
    """
    y_true = np.asarray(y_true).astype(bool)
    positives = np.sort(np.asarray(scores)[y_true])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive cases to choose a threshold on")
    k = int(np.ceil(target_sensitivity * len(positives)))  # positives that must be called
    k = min(max(k, 1), len(positives))
    return float(positives[k - 1])


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (golden-section search on log T in [-3, 3])."""
    labels = np.asarray(labels).astype(int)
    lo, hi = -3.0, 3.0
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa = negative_log_likelihood(logits, labels, np.exp(a))
    fb = negative_log_likelihood(logits, labels, np.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = negative_log_likelihood(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = negative_log_likelihood(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2.0))


def fit_logistic(z: np.ndarray, labels: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """Slope a and intercept b of p = sigmoid(a * z + b) by maximum likelihood (Newton's method with
    step halving): a temperature (1 / a) and a bias on the log-odds `z`, fitted together."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    design = np.column_stack([z, np.ones_like(z)])

    def loss(theta: np.ndarray) -> float:
        eta = design @ theta
        return float(np.mean(np.logaddexp(0.0, eta) - y * eta))

    theta = np.array([1.0, 0.0])
    current = loss(theta)
    for _ in range(steps):
        mu = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (mu - y) / len(y)
        hessian = (design * (mu * (1.0 - mu))[:, None]).T @ design / len(y)
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        scale = 1.0
        while scale > 1e-6 and loss(theta - scale * step) > current:
            scale /= 2.0
        candidate = theta - scale * step
        improvement = current - loss(candidate)
        theta, current = candidate, loss(candidate)
        if improvement < 1e-12:
            break
    if not np.all(np.isfinite(theta)) or theta[0] <= 0:
        raise ValueError(f"no usable temperature: slope {theta[0]:.4g}")
    return float(theta[0]), float(theta[1])


def format_summary(metrics: dict[str, object]) -> str:
    """One line per metric, for progress output and the model card."""
    lines = []
    for k in POINT_METRICS:
        m = metrics[k]
        assert isinstance(m, dict)
        lines.append(f"  {k:<12} {m['value']:.4f}  (95% CI {m['ci95'][0]:.4f}-{m['ci95'][1]:.4f})")
    cm = metrics["confusion_matrix"]
    assert isinstance(cm, dict)
    lines.append(
        f"  confusion    TN={cm['tn']} FP={cm['fp']} FN={cm['fn']} TP={cm['tp']}  "
        f"at threshold {metrics['threshold']:.4f}"
    )
    return "\n".join(lines)
