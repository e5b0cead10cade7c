"""Drift monitoring in `/metrics`: what the answers and their inputs look like, and how far the
recent answers have moved from the model's reference distribution.

- `cxr_answer_positive_probability`: a histogram of P(positive class) as answered (the site's
  probability where a site profile is loaded);
- `cxr_answers_total{label}`: answers by label, so `rate()` of the positive label over all is the
  positive rate;
- input statistics that carry no patient data: the stored image's longer side, the mean and the
  spread of the model's 224 px input in 8-bit grey levels, and counts by format, DICOM modality
  and DICOM manufacturer. Label values come from fixed lists (`MODALITIES`, `MANUFACTURERS`)
  plus `other`, never from the header as sent, so a series count cannot grow with traffic;
- `cxr_drift_psi`: the population stability index of the model's own calibrated P(positive) over
  the last `CXR_DRIFT_WINDOW` answers against the reference in the model contract
  (`monitoring.reference`, the validation split's distribution). The model's probability, not the
  site's, so that loading a site profile does not by itself read as drift. NaN when the model has
  no reference or nothing was answered yet; `cxr_drift_window_answers` says how full the window is.

PSI = sum over bins of (o - e) * ln(o / e), o and e the window's and the reference's shares of a
bin, each floored at `PSI_FLOOR` so that an empty bin adds a large but finite term. Common reading:
below 0.1 no real change, 0.1-0.25 a moderate shift, above 0.25 a major one. A window of n answers
from the reference distribution itself scores about (bins - 1) / n on average (sampling noise).
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.contract import ProbabilityReference
from app.serving.prediction import ServedAnswer

PSI_FLOOR = 1e-4

_PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# Longer side of the stored image, pixels: thumbnails and exports up to detector resolution.
_SIDE_BUCKETS = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 6144, 8192)
_GREY_MEAN_BUCKETS = tuple(float(v) for v in range(16, 257, 16))
_GREY_STD_BUCKETS = tuple(float(v) for v in range(8, 129, 8))

FORMATS = ("JPEG", "PNG", "DICOM")
MODALITIES = ("CR", "DX")
# Makers of radiography equipment, by a lower-case prefix of the Manufacturer value; anything else
# is `other`. Several names one maker has gone by map to one label.
MANUFACTURERS: tuple[tuple[str, str], ...] = (
    ("agfa", "agfa"),
    ("canon", "canon"),
    ("carestream", "carestream"),
    ("kodak", "carestream"),
    ("fujifilm", "fujifilm"),
    ("fuji", "fujifilm"),
    ("ge ", "ge"),
    ("ge medical", "ge"),
    ("ge healthcare", "ge"),
    ("konica", "konica_minolta"),
    ("philips", "philips"),
    ("samsung", "samsung"),
    ("shimadzu", "shimadzu"),
    ("siemens", "siemens"),
    ("toshiba", "canon"),
    ("varian", "varex"),
    ("varex", "varex"),
)
NOT_DICOM = "not_dicom"
NOT_RECORDED = "not_recorded"
OTHER = "other"


def modality_label(answer: ServedAnswer) -> str:
    if answer.format != "DICOM":
        return NOT_DICOM
    if not answer.modality:
        return NOT_RECORDED
    modality = answer.modality.strip().upper()
    return modality if modality in MODALITIES else OTHER


def manufacturer_label(answer: ServedAnswer) -> str:
    if answer.format != "DICOM":
        return NOT_DICOM
    value = (answer.manufacturer or "").strip().lower()
    if not value:
        return NOT_RECORDED
    if value == "ge":
        return "ge"
    return next((label for prefix, label in MANUFACTURERS if value.startswith(prefix)), OTHER)


def manufacturer_labels() -> list[str]:
    return sorted({label for _, label in MANUFACTURERS} | {NOT_DICOM, NOT_RECORDED, OTHER})


def population_stability_index(expected: np.ndarray, counts: np.ndarray) -> float:
    """PSI of observed bin `counts` against the `expected` shares (see the module docstring)."""
    total = float(counts.sum())
    if total <= 0:
        return math.nan
    observed = np.maximum(counts / total, PSI_FLOOR)
    reference = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((observed - reference) * np.log(observed / reference)))


class DriftWindow:
    """The bins of the last `size` answers' probabilities, and their PSI against a reference.

    Updated once per answer in O(1) and read at scrape time; a lock keeps the two consistent
    whatever thread they come from.
    """

    def __init__(self, reference: ProbabilityReference, size: int) -> None:
        self.reference = reference
        self.size = size
        self._bins: deque[int] = deque()
        self._counts = np.zeros(len(reference.fractions), dtype=np.int64)
        self._expected = np.asarray(reference.fractions, dtype=np.float64)
        self._lock = threading.Lock()

    def add(self, p: float) -> None:
        index = int(self.reference.bin_of(np.array([p]))[0])
        with self._lock:
            if len(self._bins) == self.size:
                self._counts[self._bins.popleft()] -= 1
            self._bins.append(index)
            self._counts[index] += 1

    def __len__(self) -> int:
        return len(self._bins)

    def psi(self) -> float:
        with self._lock:
            counts = self._counts.copy()
        return population_stability_index(self._expected, counts)


class DriftMetrics:
    """The drift families on the service's registry; `ServiceMetrics` forwards answers here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.positive_probability = Histogram(
            "cxr_answer_positive_probability",
            "P(positive class) as answered (after the site profile, where one is loaded).",
            buckets=_PROBABILITY_BUCKETS,
            registry=r,
        )
        self.answers = Counter(
            "cxr_answers",
            "Answers by label (the class at the operating point).",
            ["label"],
            registry=r,
        )
        self.image_side = Histogram(
            "cxr_input_image_longer_side_pixels",
            "Longer side of the uploaded image as stored, in pixels.",
            buckets=_SIDE_BUCKETS,
            registry=r,
        )
        self.input_mean = Histogram(
            "cxr_input_grey_mean",
            "Mean of the model's input image, in 8-bit grey levels (0-255).",
            buckets=_GREY_MEAN_BUCKETS,
            registry=r,
        )
        self.input_std = Histogram(
            "cxr_input_grey_std",
            "Standard deviation of the model's input image, in 8-bit grey levels.",
            buckets=_GREY_STD_BUCKETS,
            registry=r,
        )
        self.formats = Counter(
            "cxr_input_format", "Answered uploads by file format.", ["format"], registry=r
        )
        self.modalities = Counter(
            "cxr_input_modality",
            f"Answered uploads by DICOM Modality ({', '.join(MODALITIES)}, {OTHER}, "
            f"{NOT_RECORDED}; {NOT_DICOM} for JPEG and PNG).",
            ["modality"],
            registry=r,
        )
        self.manufacturers = Counter(
            "cxr_input_manufacturer",
            "Answered uploads by DICOM Manufacturer, as one of a fixed list of makers or "
            f"{OTHER} ({NOT_RECORDED} when absent, {NOT_DICOM} for JPEG and PNG).",
            ["manufacturer"],
            registry=r,
        )
        self.psi = Gauge(
            "cxr_drift_psi",
            "Population stability index of the model's calibrated P(positive) over the last "
            "CXR_DRIFT_WINDOW answers against its validation reference (NaN: no reference or no "
            "answer yet). Above 0.1 a moderate, above 0.25 a major shift.",
            registry=r,
        )
        self.window_answers = Gauge(
            "cxr_drift_window_answers",
            "Answers in the drift window (at most CXR_DRIFT_WINDOW).",
            registry=r,
        )
        self.window_size = Gauge(
            "cxr_drift_window_size", "CXR_DRIFT_WINDOW: answers the drift score covers.", registry=r
        )
        for name in FORMATS:
            self.formats.labels(name)
        for name in (*MODALITIES, OTHER, NOT_RECORDED, NOT_DICOM):
            self.modalities.labels(name)
        for name in manufacturer_labels():
            self.manufacturers.labels(name)
        self._window: DriftWindow | None = None
        self.psi.set_function(lambda: self._window.psi() if self._window else math.nan)
        self.window_answers.set_function(lambda: float(len(self._window or ())))

    def use_reference(
        self, reference: ProbabilityReference | None, window: int, classes: list[str]
    ) -> None:
        """A model started serving: score drift against its reference over `window` answers (no
        score without one), and count answers for each of its classes from zero."""
        self._window = DriftWindow(reference, window) if reference is not None else None
        self.window_size.set(window)
        for name in classes:
            self.answers.labels(name)

    def answered(self, answer: ServedAnswer) -> None:
        self.positive_probability.observe(answer.p_positive)
        self.answers.labels(answer.label).inc()
        if answer.stored_size is not None:
            self.image_side.observe(max(answer.stored_size))
        self.input_mean.observe(answer.input_mean)
        self.input_std.observe(answer.input_std)
        self.formats.labels(answer.format if answer.format in FORMATS else OTHER).inc()
        self.modalities.labels(modality_label(answer)).inc()
        self.manufacturers.labels(manufacturer_label(answer)).inc()
        if self._window is not None:
            self._window.add(answer.model_p_positive)
