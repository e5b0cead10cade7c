"""The site profile: a per-hospital recalibration and operating threshold for one exact model.

`pneumonia-validate-site` (`app.site_validation`) writes it (`site_profile.json`) from a site's own
labelled cases. The service loads it at start-up when `CXR_SITE_PROFILE` names one
(`app.model.loading` refuses to become ready unless `check_model(sha256)` passes for the ONNX file
it serves) and passes every answer's calibrated probabilities through `site_probabilities`, after
the model's own calibration: the label then comes from `operating.threshold` on the recalibrated
probability.

Recalibration is logistic on the logit: p' = sigmoid(slope * logit(p) + intercept) (Platt
scaling), or with `intercept` fixed at 0 (temperature scaling, slope = 1/T). The format is strict:
an unknown or missing key, or a value out of range, is refused rather than guessed at.

Depends on pydantic and NumPy only. It sits in the model layer so that the service may import it;
the site-validation tool above it imports it from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, overload

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROFILE_SCHEMA_VERSION = 1
# Probabilities are clipped here before the logit, so that a saturated answer (1.0 in float64) maps
# to a finite logit; fitting uses the same function, so fitting and serving agree to the last bit.
PROBABILITY_FLOOR = 1e-12

FloatArray = npt.NDArray[np.float64]


class ProfileError(ValueError):
    """The profile file is missing, unreadable or not a valid site profile."""


class ProfileModelMismatch(ProfileError):
    """The profile was fitted for a different model than the one being served."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelRef(_Strict):
    """The exact model the profile belongs to (its ONNX file's sha256)."""

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Recalibration(_Strict):
    """p' = sigmoid(slope * logit(p) + intercept), p being the model's calibrated probability."""

    method: Literal["platt", "temperature"]
    slope: float = Field(gt=0.0, allow_inf_nan=False)
    intercept: float = Field(allow_inf_nan=False)
    reason: str = Field(min_length=1, description="Why this method was chosen for these data.")
    fitted_on_images: int = Field(ge=1)
    fitted_on_patients: int = Field(ge=1)
    log_loss_before: float = Field(ge=0.0)
    log_loss_after: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _temperature_has_no_intercept(self) -> Recalibration:
        if self.method == "temperature" and self.intercept != 0.0:
            raise ValueError("temperature scaling has no intercept: it must be 0")
        return self


class Operating(_Strict):
    """The site's operating threshold, on the recalibrated probability of `positive_class`."""

    positive_class: str
    threshold: float = Field(ge=0.0, le=1.0)
    target_sensitivity: float = Field(gt=0.0, lt=1.0)
    margin: str = Field(
        min_length=1, description="How the threshold keeps the target on new cases."
    )
    margin_confidence: float = Field(gt=0.0, lt=1.0)
    shipped_threshold: float = Field(ge=0.0, le=1.0)


class SiteData(_Strict):
    """What the profile was fitted on: counts and dates only, never a patient value."""

    n_images: int = Field(ge=1)
    n_patients: int = Field(ge=1)
    n_positive: int = Field(ge=0)
    n_negative: int = Field(ge=0)
    n_refused: int = Field(ge=0)
    created: str = Field(description="UTC time the profile was written, ISO 8601.")
    source: str = Field(description="The kind of folder: kaggle or dicom.")


class SiteProfile(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    model: ModelRef
    recalibration: Recalibration
    operating: Operating
    data: SiteData
    figures: dict[str, float | None] = Field(
        description="Figures measured on the fitting data (in-sample and cross-validated)."
    )

    @property
    def sha256(self) -> str:
        """sha256 of the profile's canonical JSON (sorted keys, no spaces): the same for any file
        that holds the same profile, whatever its indentation."""
        return hashlib.sha256(canonical_json(self).encode("utf-8")).hexdigest()

    def check_model(self, sha256: str) -> None:
        """Raise `ProfileModelMismatch` unless the profile was fitted for the model `sha256`."""
        if sha256 != self.model.sha256:
            raise ProfileModelMismatch(
                f"site profile {self.name!r} was fitted for model sha256 "
                f"{self.model.sha256[:12]}... ({self.model.name} {self.model.version}), "
                "but the served model is "
                f"{sha256[:12]}...: validate the site again for this model"
            )

    @overload
    def apply(self, p_positive: float) -> float: ...
    @overload
    def apply(self, p_positive: FloatArray) -> FloatArray: ...
    def apply(self, p_positive: float | FloatArray) -> float | FloatArray:
        """The site's probability of the positive class, from the model's calibrated one."""
        recal = self.recalibration
        return recalibrate(p_positive, recal.slope, recal.intercept)

    def site_probabilities(self, probabilities: FloatArray, positive_index: int) -> FloatArray:
        """One image's class probabilities (the model's calibrated ones, summing to 1) -> the
        site's.

        The positive class gets `apply(p)`; the other classes share what is left, 1 - p', in the
        proportions the model gave them (for two classes: exactly 1 - p'), so that the answer still
        sums to 1 and their order is unchanged. Should the model leave them nothing (p = 1), they
        share 1 - p' equally.
        """
        p = np.asarray(probabilities, dtype=np.float64)
        p_site = self.apply(float(p[positive_index]))
        others = np.delete(p, positive_index)
        rest = float(others.sum())
        shares = others / rest if rest > 0.0 else np.full(others.shape, 1.0 / others.size)
        result: FloatArray = np.insert(shares * (1.0 - p_site), positive_index, p_site)
        return result


def logit(p: float | FloatArray) -> FloatArray:
    """log(p / (1 - p)) with p clipped to [PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]."""
    clipped = np.clip(np.asarray(p, dtype=np.float64), PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    result: FloatArray = np.log(clipped) - np.log1p(-clipped)
    return result


def sigmoid(z: FloatArray) -> FloatArray:
    result: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))
    return result


@overload
def recalibrate(p_positive: float, slope: float, intercept: float) -> float: ...
@overload
def recalibrate(p_positive: FloatArray, slope: float, intercept: float) -> FloatArray: ...
def recalibrate(
    p_positive: float | FloatArray, slope: float, intercept: float
) -> float | FloatArray:
    """sigmoid(slope * logit(p) + intercept), elementwise; a float for a float."""
    out = sigmoid(slope * logit(p_positive) + intercept)
    if isinstance(p_positive, float | int):
        return float(out)
    return out


def canonical_json(profile: SiteProfile) -> str:
    return json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def dump(profile: SiteProfile, path: Path) -> None:
    """Write the profile as indented JSON (its `sha256` does not depend on the indentation)."""
    text = json.dumps(profile.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")


def load(path: Path | str) -> SiteProfile:
    """Read and validate a profile; `ProfileError` says what is wrong (never a patient value: the
    file holds none)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read site profile {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"site profile {path} is not JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    try:
        return SiteProfile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ProfileError(f"site profile {path} is invalid: {problems}") from exc
