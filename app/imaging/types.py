"""What every decoder shares: the size limits, the decoded image, and the errors decoders raise."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from app.errors import ImageTooManyPixels, ImageTooSmall
from app.imaging.dicom import DicomFindings
from app.imaging.preprocessing import WaveletApproximation


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
