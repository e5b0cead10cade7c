"""What every decoder shares: the size limits, the decoded image, and the errors decoders raise."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from app.errors import ImageTooManyPixels, ImageTooSmall
from app.imaging.preprocessing import WaveletApproximation


@dataclass(frozen=True)
class AppliedWindow:
    """The VOI step as applied, in modality units (after Rescale Slope/Intercept)."""

    source: str  # "window" | "voi_lut_sequence" | "full_range"
    center: float | None = None
    width: float | None = None
    function: str | None = None


@dataclass(frozen=True)
class DicomFindings:
    """What the service may say back about a DICOM upload: identifiers and what it did."""

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    modality: str
    view_position: str | None
    transfer_syntax: str
    window: AppliedWindow
    warnings: list[str] = field(default_factory=list)
    # The equipment's Manufacturer as recorded (not a patient value); only the metrics read it,
    # and they count it under a fixed list of names (`app.ops.drift`), never as sent.
    manufacturer: str | None = None


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    min_side: int
    # The contract's JPEG DCT scaling (`preprocessing.jpeg_scale_denominator` bound to the model's
    # contract): stored width, height -> the denominator d to decode at (1: full size).
    jpeg_scale: Callable[[int, int], int] | None = None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload: the image for `preprocessing.to_model_input`, its detected format, and
    for DICOM what the header said that the response may repeat."""

    image: Image.Image
    format: str
    dicom: DicomFindings | None = None
    # Width and height as stored, when the decode is smaller (a JPEG decoded at a reduced scale).
    stored_size: tuple[int, int] | None = None
    # A JPEG 2000 DICOM frame decoded at a reduced resolution level, which the resize makes up for.
    approximation: WaveletApproximation | None = None


# Exceptions Pillow's decoders are known to raise on malformed or hostile input.
DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,  # raised by several plugins for a broken header
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)


def check_dimensions(width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse images by their declared size, before their pixels are decompressed."""
    if width * height > limits.max_pixels:
        raise ImageTooManyPixels(
            f"image declares {width}x{height} = {width * height} pixels, "
            f"above the limit of {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(
            f"image is {width}x{height}; both sides must be at least {limits.min_side} px"
        )
