"""DICOM reading for the RSNA Pneumonia Detection data (training side).

Photometric handling follows the DICOM standard's display pipeline: stored values -> Modality LUT
(rescale slope/intercept) -> VOI LUT or window -> MONOCHROME1 inverted so that air is dark, as in
the JPEG training images. The result is handed to the same `minmax` 8-bit rule as 16-bit PNGs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.preprocessing import stretch_to_uint8


def dicom_to_uint8(pixels: np.ndarray, dataset) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Apply modality LUT, VOI LUT/window and MONOCHROME1 inversion; return 8-bit grey pixels."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, dataset)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        values = apply_voi_lut(values, dataset)
    grey = stretch_to_uint8(np.asarray(values))
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def read_dicom_as_image(path: Path) -> Image.Image:
    """Read a single-frame greyscale DICOM file into an 8-bit Pillow `L` image."""
    import pydicom

    dataset = pydicom.dcmread(str(path))
    pixels = dataset.pixel_array
    if pixels.ndim == 3 and dataset.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    if pixels.ndim != 2:
        raise ValueError(f"{Path(path).name}: expected a greyscale image, got shape {pixels.shape}")
    return Image.fromarray(dicom_to_uint8(pixels, dataset), mode="L")
