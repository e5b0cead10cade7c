"""The site profile format: strict, hashable independently of layout, bound to one model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.model import site_profile as profile
from app.model.site_profile import ProfileError, ProfileModelMismatch

SHA = "a" * 64


def valid() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": "st-elsewhere-2026",
        "model": {"name": "pneumonia_cxr", "version": "1.0.0", "sha256": SHA},
        "recalibration": {
            "method": "platt",
            "slope": 0.64,
            "intercept": -2.5,
            "reason": "enough of both classes",
            "fitted_on_images": 624,
            "fitted_on_patients": 426,
            "log_loss_before": 0.49,
            "log_loss_after": 0.19,
        },
        "operating": {
            "positive_class": "PNEUMONIA",
            "threshold": 0.376,
            "target_sensitivity": 0.95,
            "margin": "one-sided 90% Clopper-Pearson lower bound >= 95%",
            "margin_confidence": 0.9,
            "shipped_threshold": 0.8649,
        },
        "data": {
            "n_images": 624,
            "n_patients": 426,
            "n_positive": 390,
            "n_negative": 234,
            "n_refused": 0,
            "created": "2026-12-01T09:00:00+00:00",
            "source": "kaggle",
        },
        "figures": {"auc": 0.97, "ece_site_cross_validated": None},
    }


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "site_profile.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_valid_profile_loads_and_applies_platt(tmp_path: Path) -> None:
    loaded = profile.load(write(tmp_path, valid()))
    p = np.array([0.01, 0.5, 0.9, 0.999])
    expected = 1.0 / (1.0 + np.exp(-(0.64 * np.log(p / (1 - p)) - 2.5)))
    np.testing.assert_allclose(loaded.apply(p), expected, rtol=1e-12)
    assert isinstance(loaded.apply(0.9), float)
    assert loaded.apply(0.9) == pytest.approx(float(expected[2]), rel=1e-12)
    # saturated answers stay finite and ordered
    assert 0.0 < loaded.apply(0.0) < loaded.apply(1e-6) < loaded.apply(1.0) < 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra_key=1), "extra_key"),
        (lambda d: d["recalibration"].pop("slope"), "recalibration.slope"),
        (lambda d: d["recalibration"].update(slope=0.0), "recalibration.slope"),
        (lambda d: d["recalibration"].update(slope="0.64"), "recalibration.slope"),
        (lambda d: d["recalibration"].update(method="isotonic"), "recalibration.method"),
        (lambda d: d["recalibration"].update(method="temperature"), "no intercept"),
        (lambda d: d["operating"].update(threshold=1.5), "operating.threshold"),
        (lambda d: d["model"].update(sha256="ABC"), "model.sha256"),
        (lambda d: d.update(schema_version=2), "schema_version"),
    ],
)
def test_profiles_are_strict(tmp_path: Path, edit: Any, message: str) -> None:
    data = valid()
    edit(data)
    with pytest.raises(ProfileError, match="is invalid") as caught:
        profile.load(write(tmp_path, data))
    assert message in str(caught.value)


def test_not_json_and_missing_files_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ProfileError, match="is not JSON"):
        profile.load(path)
    with pytest.raises(ProfileError, match="cannot read"):
        profile.load(tmp_path / "absent.json")


def test_model_mismatch_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    loaded = profile.load(write(tmp_path, valid()))
    loaded.check_model(SHA)  # the model it was fitted for
    with pytest.raises(ProfileModelMismatch) as caught:
        loaded.check_model("b" * 64)
    text = str(caught.value)
    assert "aaaaaaaaaaaa" in text and "bbbbbbbbbbbb" in text
    assert "validate the site again" in text
    assert isinstance(caught.value, ProfileError)


def test_sha256_ignores_layout_and_follows_content(tmp_path: Path) -> None:
    compact = profile.load(write(tmp_path, valid()))
    indented = tmp_path / "indented.json"
    profile.dump(compact, indented)
    again = profile.load(indented)
    assert again == compact and again.sha256 == compact.sha256
    assert len(compact.sha256) == 64
    changed = valid()
    changed["operating"]["threshold"] = 0.377
    assert profile.load(write(tmp_path, changed)).sha256 != compact.sha256


def test_temperature_profiles_have_no_intercept(tmp_path: Path) -> None:
    data = valid()
    data["recalibration"].update(method="temperature", slope=0.5, intercept=0.0)
    loaded = profile.load(write(tmp_path, data))
    assert loaded.apply(0.5) == pytest.approx(0.5)
    assert loaded.apply(0.9) == pytest.approx(1 / (1 + 9**-0.5))
