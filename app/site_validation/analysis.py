"""From served probabilities and labels to every figure of the site report.

The site's operating point is fitted in two steps, both on the site's data: a recalibration of the
served probability (`fitting.fit_recalibration`), then the most specific threshold on the
recalibrated probability whose sensitivity keeps a one-sided Clopper-Pearson lower bound at the
target (`metrics.threshold_with_margin`). In-sample figures judge that fit on the data it was
fitted on, so they flatter it; the cross-validated figures (k folds by patient, the fit repeated on
k-1 folds and scored on the held-out one) and the split-half check are the ones to plan with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from app.model.site_profile import FloatArray, logit, sigmoid
from app.site_validation import metrics as m
from app.site_validation.fitting import Fit, FitError, fit_recalibration

DEFAULT_FOLDS = 5
DEFAULT_RESAMPLES = 1000
RELIABILITY_BINS = 10
MIN_SUBGROUP_IMAGES = 5  # smaller subgroups are counted, not given rates
ROC_POINTS = 300


@dataclass(frozen=True)
class SiteFit:
    """A recalibration and the threshold chosen on it, from one set of cases."""

    fit: Fit
    margin: m.MarginThreshold

    def site_probability(self, p: FloatArray) -> FloatArray:
        return self.fit.apply(p)

    def served_equivalent_threshold(self) -> float:
        """The served probability that the site threshold corresponds to (monotone inverse)."""
        t = self.margin.threshold
        z = (float(logit(t)) - self.fit.intercept) / self.fit.slope
        return float(sigmoid(np.array(z)))


def fit_site(
    labels: m.BoolArray, p: FloatArray, target_sensitivity: float, confidence: float
) -> SiteFit:
    fit = fit_recalibration(p, labels.astype(np.float64))
    margin = m.threshold_with_margin(labels, fit.apply(p), target_sensitivity, confidence)
    return SiteFit(fit, margin)


def operating_figures(
    labels: m.BoolArray, called: m.BoolArray, weights: FloatArray | None
) -> dict[str, Any]:
    """Confusion counts, rates and (given bootstrap weights) their patient-level intervals."""
    counts = {
        "tp": int(np.sum(called & labels)),
        "fp": int(np.sum(called & ~labels)),
        "tn": int(np.sum(~called & ~labels)),
        "fn": int(np.sum(~called & labels)),
    }
    out: dict[str, Any] = {"confusion": counts, **m.rates(counts)}
    if weights is not None:
        out["ci95"] = m.bootstrap_rates(labels, called, weights)
    return out


def cross_validate(
    labels: m.BoolArray,
    p: FloatArray,
    patients: m.IntArray,
    n_patients: int,
    target_sensitivity: float,
    confidence: float,
    folds: int,
    seed: int,
) -> dict[str, Any] | None:
    """Held-out site probabilities and decisions, each image scored by a fit that never saw its
    patient; None when there are too few patients of a class for two folds."""
    positive_patients = len(set(patients[labels].tolist()))
    negative_patients = len(set(patients[~labels].tolist()))
    k = min(folds, positive_patients, negative_patients)
    if k < 2:
        return None
    fold = m.patient_folds(patients, n_patients, labels, k, seed)
    held_p = np.empty_like(p)
    called = np.zeros(len(p), dtype=bool)
    per_fold = []
    for f in range(k):
        train, test = fold != f, fold == f
        try:
            site = fit_site(labels[train], p[train], target_sensitivity, confidence)
        except (FitError, ValueError) as exc:
            return {"folds": k, "failed": f"fold {f + 1}: {exc}"}
        held_p[test] = site.site_probability(p[test])
        called[test] = held_p[test] >= site.margin.threshold
        held_out = m.rates(_counts(labels[test], called[test]))
        per_fold.append(
            {
                "fold": f + 1,
                "images": int(test.sum()),
                "method": site.fit.method,
                "slope": site.fit.slope,
                "intercept": site.fit.intercept,
                "threshold": site.margin.threshold,
                "held_out_sensitivity": held_out["sensitivity"],
                "held_out_specificity": held_out["specificity"],
            }
        )
    return {"folds": k, "p_site": held_p, "called": called, "per_fold": per_fold}


def _counts(labels: m.BoolArray, called: m.BoolArray) -> dict[str, int]:
    return m.confusion(labels, called.astype(np.float64), 0.5)


def _downsample_roc(fpr: FloatArray, tpr: FloatArray) -> tuple[list[float], list[float]]:
    if len(fpr) > ROC_POINTS:
        keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, ROC_POINTS).astype(int), len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return [round(float(v), 5) for v in fpr], [round(float(v), 5) for v in tpr]


def _bins(labels: m.BoolArray, p: FloatArray) -> list[dict[str, float]]:
    return [asdict(b) for b in m.reliability(labels, p, RELIABILITY_BINS)]


def _histogram(p: FloatArray, labels: m.BoolArray, bins: int = 20) -> dict[str, list[int]]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "NORMAL": np.histogram(p[~labels], edges)[0].tolist(),
        "PNEUMONIA": np.histogram(p[labels], edges)[0].tolist(),
    }


def analyse(
    labels: m.BoolArray,
    p: FloatArray,
    patients: m.IntArray,
    n_patients: int,
    shipped_threshold: float,
    target_sensitivity: float,
    confidence: float,
    subgroups: Mapping[str, Sequence[str | None]] | None = None,
    folds: int = DEFAULT_FOLDS,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[SiteFit, dict[str, Any]]:
    """The site fit on all cases, and every figure of the report (JSON-ready)."""
    weights = m.patient_bootstrap_weights(patients, n_patients, resamples, seed)
    site = fit_site(labels, p, target_sensitivity, confidence)
    p_site = site.site_probability(p)
    called_site = p_site >= site.margin.threshold
    called_shipped = p >= shipped_threshold
    fpr, tpr, _ = m.roc_curve(labels, p)
    roc_fpr, roc_tpr = _downsample_roc(fpr, tpr)
    cv = cross_validate(
        labels, p, patients, n_patients, target_sensitivity, confidence, folds, seed
    )
    figures: dict[str, Any] = {
        "counts": {
            "images": len(p),
            "patients": n_patients,
            "positive_images": int(labels.sum()),
            "negative_images": int((~labels).sum()),
            "positive_patients": len(set(patients[labels].tolist())),
            "negative_patients": len(set(patients[~labels].tolist())),
        },
        "auc": {"value": m.roc_auc(labels, p), "ci95": m.bootstrap_auc(labels, p, weights)},
        "roc": {"fpr": roc_fpr, "tpr": roc_tpr},
        "recalibration": asdict(site.fit),
        "site_threshold": {
            **asdict(site.margin),
            "target_sensitivity": target_sensitivity,
            "confidence": confidence,
            "served_equivalent": site.served_equivalent_threshold(),
        },
        "shipped_threshold": shipped_threshold,
        "ece": {
            "served": m.expected_calibration_error(labels, p),
            "site_in_sample": m.expected_calibration_error(labels, p_site),
        },
        "log_loss": {
            "served": site.fit.log_loss_before,
            "site_in_sample": site.fit.log_loss_after,
        },
        "reliability": {"served": _bins(labels, p), "site_in_sample": _bins(labels, p_site)},
        "at_shipped_threshold": operating_figures(labels, called_shipped, weights),
        "at_site_threshold": {"in_sample": operating_figures(labels, called_site, weights)},
        "histograms": {"served": _histogram(p, labels), "site": _histogram(p_site, labels)},
        "bootstrap": {
            "resamples": resamples,
            "unit": "patient",
            "interval": "percentile, 95%",
            "seed": seed,
        },
    }
    if cv is None:
        figures["cross_validation"] = {"skipped": "fewer than two patients of a class"}
    elif "failed" in cv:
        figures["cross_validation"] = {"folds": cv["folds"], "skipped": cv["failed"]}
    else:
        held_p, held_called = cv["p_site"], cv["called"]
        figures["cross_validation"] = {"folds": cv["folds"], "per_fold": cv["per_fold"]}
        figures["at_site_threshold"]["cross_validated"] = operating_figures(
            labels, held_called, weights
        )
        figures["ece"]["site_cross_validated"] = m.expected_calibration_error(labels, held_p)
        figures["reliability"]["site_cross_validated"] = _bins(labels, held_p)
    figures["subgroups"] = subgroup_figures(
        labels, p, called_site, cv["called"] if cv and "called" in cv else None, subgroups or {}
    )
    return site, figures


def subgroup_figures(
    labels: m.BoolArray,
    p: FloatArray,
    called_site: m.BoolArray,
    called_cv: m.BoolArray | None,
    subgroups: Mapping[str, Sequence[str | None]],
) -> dict[str, list[dict[str, Any]]]:
    """Per subgroup value: counts, AUC, and sensitivity/specificity at the site threshold."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, values in sorted(subgroups.items()):
        members: dict[str, list[int]] = defaultdict(list)
        for i, value in enumerate(values):
            if value is not None:
                members[value].append(i)
        if len(members) < 1:
            continue
        rows = []
        for value, index in sorted(members.items()):
            idx = np.array(index)
            y = labels[idx]
            row: dict[str, Any] = {
                "value": value,
                "images": len(idx),
                "positive": int(y.sum()),
                "negative": int((~y).sum()),
            }
            if len(idx) >= MIN_SUBGROUP_IMAGES:
                row["auc"] = m.roc_auc(y, p[idx]) if 0 < y.sum() < len(y) else None
                site_rates = m.rates(_counts(y, called_site[idx]))
                row["sensitivity"] = site_rates["sensitivity"]
                row["specificity"] = site_rates["specificity"]
                if called_cv is not None:
                    cv_rates = m.rates(_counts(y, called_cv[idx]))
                    row["sensitivity_cv"] = cv_rates["sensitivity"]
                    row["specificity_cv"] = cv_rates["specificity"]
            rows.append(row)
        out[key] = rows
    return out


def split_halves(
    patients: m.IntArray, n_patients: int, labels: m.BoolArray, seed: int
) -> tuple[m.BoolArray, m.BoolArray]:
    """Two halves of the cases by patient (positive and negative patients dealt separately)."""
    half = m.patient_folds(patients, n_patients, labels, 2, seed)
    return half == 0, half == 1


def held_out_figures(
    labels: m.BoolArray,
    p_site: FloatArray,
    threshold: float,
    patients: m.IntArray,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Figures of a fitted profile on cases it was not fitted on."""
    index, n = m.patient_index([str(v) for v in patients.tolist()])
    weights = m.patient_bootstrap_weights(index, n, resamples, seed)
    called = p_site >= threshold
    return {
        "images": len(labels),
        "patients": n,
        "positive_images": int(labels.sum()),
        "ece": m.expected_calibration_error(labels, p_site),
        "auc": m.roc_auc(labels, p_site),
        **operating_figures(labels, called, weights),
        "reliability": _bins(labels, p_site),
    }
