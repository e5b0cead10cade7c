"""The calibration and decision rule the metadata prescribes, as `ModelMetadata` methods.

Training's evaluation step uses these methods; the service's `calibrated_probabilities` and
`Classifier.label_for` implement the same rule, and the last tests hold the two together.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.contract import ModelMetadata
from app.model.classifier import calibrated_probabilities
from app.model.loading import load_classifier
from tests.support.testkit import build_onnx, make_settings, metadata_for

THREE = ["NORMAL", "PNEUMONIA", "OTHER"]


def _meta(**overrides: object) -> ModelMetadata:
    return ModelMetadata.model_validate(metadata_for(build_onnx(), **overrides))


def test_temperature_divides_the_logits_before_softmax() -> None:
    meta = _meta(calibration={"method": "temperature", "temperature": 2.0})
    p = meta.calibrated_probabilities(np.array([[0.0, 2.0], [3.0, -1.0]]))
    assert p[0, 1] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert p[1, 0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_extreme_logits_stay_finite() -> None:
    p = _meta().calibrated_probabilities(np.array([[1000.0, -1000.0]]))
    np.testing.assert_array_equal(p, [[1.0, 0.0]])


def test_a_probability_head_goes_through_log_space() -> None:
    head = {"name": "logits", "shape": [None, 2], "kind": "probabilities"}
    plain = _meta(output=head, calibration={"method": "none"})
    np.testing.assert_allclose(plain.calibrated_probabilities(np.array([[0.2, 0.8]])), [[0.2, 0.8]])
    sharpened = _meta(output=head, calibration={"method": "temperature", "temperature": 0.5})
    # (0.2, 0.8) ** 2, renormalised
    np.testing.assert_allclose(
        sharpened.calibrated_probabilities(np.array([[0.2, 0.8]])), [[0.04 / 0.68, 0.64 / 0.68]]
    )


@pytest.mark.parametrize(("p_positive", "label"), [(0.3, "PNEUMONIA"), (0.2999, "NORMAL")])
def test_the_threshold_is_inclusive(p_positive: float, label: str) -> None:
    meta = _meta(decision={"threshold": 0.3, "positive_class": "PNEUMONIA"})
    assert meta.label_at_operating_point(np.array([1 - p_positive, p_positive])) == label


def test_below_threshold_the_most_probable_other_class_wins() -> None:
    meta = _meta(
        classes=THREE,
        output={"name": "logits", "shape": [None, 3], "kind": "logits"},
        decision={"threshold": 0.5, "positive_class": "PNEUMONIA"},
    )
    assert meta.label_at_operating_point(np.array([0.2, 0.45, 0.35])) == "OTHER"
    assert meta.label_at_operating_point(np.array([0.1, 0.5, 0.4])) == "PNEUMONIA"


def test_the_service_applies_the_same_rule(write_model) -> None:  # type: ignore[no-untyped-def]
    path = write_model(
        decision={"threshold": 0.62, "positive_class": "PNEUMONIA"},
        calibration={"method": "temperature", "temperature": 1.7},
    )
    classifier = load_classifier(make_settings(path))
    meta = classifier.metadata
    logits = np.random.default_rng(0).normal(0, 3, (200, 2))
    ours = meta.calibrated_probabilities(logits)
    np.testing.assert_array_equal(ours, calibrated_probabilities(logits, meta))
    for row in ours:
        assert meta.label_at_operating_point(row) == classifier.label_for(row)


def test_a_logit_bias_shifts_the_log_odds_after_the_temperature() -> None:
    import json

    from tests.support.realdata import SHIPPED_METADATA

    raw = json.loads(SHIPPED_METADATA.read_text())
    raw["calibration"] = {"method": "temperature", "temperature": 2.0, "logit_bias": [0.0, -1.5]}
    meta = ModelMetadata.model_validate(raw)
    logits = np.array([[0.3, 4.3], [1.0, -2.0]])
    p = meta.calibrated_probabilities(logits)[:, 1]
    z = (logits[:, 1] - logits[:, 0]) / 2.0 - 1.5
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-z)))
    raw["calibration"]["logit_bias"] = [0.0]
    with pytest.raises(ValueError, match="one per class"):
        ModelMetadata.model_validate(raw)
    # without a bias the metadata serialises as it always did
    del raw["calibration"]["logit_bias"]
    assert "logit_bias" not in ModelMetadata.model_validate(raw).model_dump_json()
