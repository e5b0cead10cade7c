"""The evaluation arithmetic that the model card and a site's report share (`app.evaluation`),
pinned on cases worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from app import evaluation as ev


def test_auc_counts_ties_as_one_half_and_weights_as_copies() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.6, 0.8, 0.3])
    # positive/negative pairs: (0.6 vs 0.1) win, (0.6 vs 0.6) tie, (0.8 vs both) 2 wins,
    # (0.3 vs 0.1) win, (0.3 vs 0.6) loss: 4.5 of 6
    assert ev.roc_auc(labels, scores) == pytest.approx(4.5 / 6)
    weights = np.array([1.0, 1.0, 1.0, 1.0, 2.0])  # the 0.3 positive twice
    copied = ev.roc_auc(np.r_[labels, 1], np.r_[scores, 0.3])
    assert ev.roc_auc(labels, scores, weights) == pytest.approx(copied)
    assert np.isnan(ev.roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_ece_bins_are_equal_width_and_weighted_by_their_share() -> None:
    labels = np.array([1, 0, 1, 1])
    p = np.array([0.95, 0.95, 0.2, 1.0])  # bins 14, 14, 3, 14 (p = 1 in the last)
    # bin 14: 3 images, mean p 0.9667, observed 2/3; bin 3: 1 image, p 0.2, observed 1
    expected = 0.75 * abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3) + 0.25 * abs(1 - 0.2)
    assert ev.expected_calibration_error(labels, p) == pytest.approx(expected)


def test_confusion_and_the_roc_curve_agree_at_every_threshold() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 2)  # ties
    fpr, tpr, thresholds = ev.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    for f, t, threshold in zip(fpr[1:], tpr[1:], thresholds[1:], strict=True):
        c = ev.confusion(labels, scores, threshold)
        assert t == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
        assert f == pytest.approx(c["fp"] / (c["fp"] + c["tn"]))
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert ev.roc_auc(labels, scores) == pytest.approx(area)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1_virus_6.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
        ("scan.png", None),
    ],
)
def test_kermany_names_give_their_patient(name: str, patient: str | None) -> None:
    assert ev.kermany_patient(name) == patient


def test_the_site_report_and_training_take_their_figures_from_here() -> None:
    from app.site_validation import metrics as site

    assert site.expected_calibration_error is ev.expected_calibration_error
    assert site.roc_auc is ev.roc_auc
    assert site.confusion is ev.confusion


def test_groups_link_through_any_shared_key_transitively() -> None:
    keys = [
        ["patient:a", "image:1"],
        ["patient:b"],
        ["patient:c", "image:1"],  # the same image filed under patient c: joins a
        ["patient:c", "image:2"],
        ["patient:b", "image:3"],
        ["patient:d"],
    ]
    assert ev.linked_groups(keys) == [0, 1, 0, 0, 1, 5]
    assert ev.linked_groups([]) == []
