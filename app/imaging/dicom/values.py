"""Header values the service may repeat, and the rules that make them safe to: coded values
sanitised before they go into an error message, UIDs checked for form, dates and ages parsed without
ever being quoted. The other DICOM modules and the intakes read header values through these."""

from __future__ import annotations

import math
import re
from datetime import date

import pydicom
from pydicom.dataset import Dataset

SAFE_CODE = re.compile(r"^[A-Za-z0-9 _\-.]{1,64}$")
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def code(value: object) -> str:
    """A coded header value, fit to quote in an error message (or a placeholder)."""
    text = str(value).strip() if value is not None else ""
    return text.upper() if SAFE_CODE.match(text) else "an unrecognised value"


def is_uid(text: str) -> bool:
    """A well-formed UID: dot-separated digits, at most 64 characters (safe to log and to name a
    file after)."""
    return len(text) <= 64 and UID_PATTERN.match(text) is not None


def uid(dataset: Dataset, keyword: str) -> str | None:
    value = str(dataset.get(keyword, "") or "").strip().rstrip("\x00")
    return value if is_uid(value) else None


def parse_da(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """Age in years from Patient's Age (AS: 005Y, 018M, 003W, 012D), else from Patient's Birth
    Date and the study (or acquisition, or content) date; None when neither is usable."""
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{3})([DWMY])", age)
    if match:
        days_per_unit = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}[match.group(2)]
        return int(match.group(1)) * days_per_unit / 365.25
    birth = parse_da(ds.get("PatientBirthDate"))
    seen = next(
        (
            d
            for d in (parse_da(ds.get(k)) for k in ("StudyDate", "AcquisitionDate", "ContentDate"))
            if d is not None
        ),
        None,
    )
    if birth is None or seen is None or seen < birth:
        return None
    return (seen - birth).days / 365.25


def is_signed(ds: Dataset) -> bool:
    return bool(ds.get("PixelRepresentation", 0) == 1)


def first_number(value: object, index: int) -> float | None:
    """The `index`-th value of a (possibly multi-valued) numeric attribute, if finite."""
    values = list(value) if isinstance(value, pydicom.multival.MultiValue | list) else [value]
    if index >= len(values):
        return None
    try:
        number = float(values[index])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
