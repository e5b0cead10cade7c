"""The display pipeline: stored pixel values -> the 8-bit grey image a viewer would show, by the
contract's `DicomRendering` (modality LUT or rescale, VOI from a window, a VOI LUT or the full
range, polarity, padding). Evaluated once per possible stored value into a lookup table, then
applied with one indexing pass, so a 12-bit 2500x2048 image never exists as a float64 copy."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset

from app.contract import DicomRendering
from app.errors import InvalidImage
from app.imaging.dicom.values import first_number, is_signed
from app.imaging.types import AppliedWindow


def lut_values(item: Dataset, signed: bool) -> tuple[np.ndarray, int, int]:
    """(table, first mapped value, bits) of a Modality/VOI LUT Sequence item."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # 0 means 2**16 entries
    if signed and first >= 32768:  # the first mapped value is SS for signed pixels
        first -= 65536
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        dtype = "<u1" if bits <= 8 and len(raw) == entries else "<u2"
        table = np.frombuffer(raw, dtype=dtype).astype(np.float64)
    else:
        table = np.asarray(raw if isinstance(raw, list | tuple) else [raw], dtype=np.float64)
    if table.size < entries or not 1 <= bits <= 16:
        raise InvalidImage("a DICOM LUT does not match its descriptor")
    return table[:entries], first, bits


def modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        table, first, _ = lut_values(ds.ModalityLUTSequence[0], is_signed(ds))
        index = np.clip(stored - first, 0, table.size - 1).astype(np.intp)
        mapped: np.ndarray = table[index]
        return mapped
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise InvalidImage("the DICOM Rescale Slope/Intercept are not finite numbers")
    return stored * slope + intercept


def window_function(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray | None:
    if function == "SIGMOID":
        return None if w <= 0 else 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return None if w <= 0 else np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function == "LINEAR":
        if w == 1:  # the standard's limit case: a threshold at c - 0.5 (no division by zero)
            return np.where(x > c - 0.5, 1.0, 0.0)
        return None if w < 1 else np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    return None


def voi(
    x: np.ndarray,
    present: Callable[[], np.ndarray],
    ds: Dataset,
    rule: DicomRendering,
    notes: list[str],
) -> tuple[np.ndarray, AppliedWindow]:
    """VOI over modality values `x`; `present()` marks the values that occur outside padding
    (counted only when the full range is needed: a histogram of every pixel)."""
    for source in rule.voi_order:
        if source == "window" and "WindowCenter" in ds and "WindowWidth" in ds:
            c = first_number(ds.WindowCenter, rule.window_index)
            w = first_number(ds.WindowWidth, rule.window_index)
            function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
            if c is not None and w is not None:
                v = window_function(x, c, w, function)
                if v is not None:
                    return v, AppliedWindow("window", c, w, function)
            notes.append("the DICOM window (Window Center/Width) is unusable and was ignored")
        elif source == "voi_lut_sequence" and len(ds.get("VOILUTSequence", None) or []):
            table, first, bits = lut_values(ds.VOILUTSequence[0], is_signed(ds))
            index = np.clip(np.floor(x) - first, 0, table.size - 1).astype(np.intp)
            v = np.minimum(table[index] / float(2**bits - 1), 1.0)
            return v, AppliedWindow("voi_lut_sequence")
        elif source == "full_range":
            occurs = present()
            lo, hi = (float(x[occurs].min()), float(x[occurs].max())) if occurs.any() else (0, 0)
            window = AppliedWindow("full_range", (lo + hi) / 2.0, hi - lo)
            if hi <= lo:
                return np.zeros_like(x), window
            return (x - lo) / (hi - lo), window
    raise AssertionError("voi_order ends with full_range")  # enforced by the contract


def padding_mask(stored_domain: np.ndarray, ds: Dataset) -> np.ndarray:
    padding = ds.get("PixelPaddingValue")
    if padding is None:
        return np.zeros(stored_domain.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit")
    a = int(padding)
    b = int(limit) if limit is not None else a
    lo, hi = min(a, b), max(a, b)
    return (stored_domain >= lo) & (stored_domain <= hi)


def render_dicom(
    ds: Dataset, stored: np.ndarray, rule: DicomRendering
) -> tuple[np.ndarray, AppliedWindow, list[str]]:
    """Stored pixel values -> uint8 grey image by the contract's display pipeline.

    The pipeline runs once over every value the stored dtype can hold (256 or 65536 of them) and
    the image is then one table lookup.
    """
    if stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2:
        raise InvalidImage(f"unsupported DICOM pixel array type {stored.dtype}")
    unsigned = stored.dtype.kind == "u"
    n_values = 1 << (8 * stored.dtype.itemsize)
    # An order-preserving unsigned index per pixel: signed values are offset by half the range.
    index = stored if unsigned else (stored.view(f"u{stored.dtype.itemsize}") ^ (n_values >> 1))
    domain = np.arange(n_values, dtype=np.float64) - (0 if unsigned else n_values >> 1)
    padding = padding_mask(domain, ds)

    def present() -> np.ndarray:
        occurs = np.bincount(index.ravel(), minlength=n_values) > 0
        return occurs & ~padding if rule.full_range_excludes_padding else occurs

    notes: list[str] = []
    x = modality_values(domain, ds)
    v, window = voi(x, present, ds, rule, notes)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        v = 1.0 - v
    finite = np.isfinite(v)
    if not finite.all():
        # Only absurd values (a rescale near the float limits, a full range that overflows) get
        # here. A NaN cast to uint8 would be an arbitrary grey, answered as if it were the image:
        # refused when a pixel (other than padding) has such a value, else those entries unused.
        if not (finite | padding)[index].all():
            raise InvalidImage("the DICOM rescale and window values do not give a finite image")
        v = np.where(finite, v, 0.0)
    table = np.rint(v * 255.0).astype(np.uint8)
    table[padding] = rule.padding_value
    return table[index], window, notes
