"""Lossless DICOM frames decoded by imagecodecs: exact stored values, off the interpreter lock.

pydicom's plugins for JPEG Lossless (pylibjpeg-libjpeg), JPEG-LS (pyjpegls) and JPEG 2000
(pylibjpeg-openjpeg) hold Python's interpreter lock for the whole decode. On a 2500x2048 12-bit
frame that is about 300, 130 and 500 ms during which the event loop, and the probe port's thread,
stand still (`scripts/dev/decode_benchmark.py` measures it; docs/PERFORMANCE.md). imagecodecs runs
the same kinds of decoder (libjpeg-turbo, CharLS, OpenJPEG on `threads` threads) with the lock
released, and faster.

A lossless codestream decodes to the same values in every conforming decoder, so for these
syntaxes the switch changes no pixel (a test compares with pydicom on every kind of frame). Only
frames whose codestream says what the header says qualify: one component, the header's Bits Stored
as its precision, unsigned pixels (Pixel Representation 0), and for JPEG 2000 the reversible 5/3
wavelet with no image offset. Everything else, and every lossy syntax (whose decoders round
differently, and which training decodes with pydicom), stays with pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial

import numpy as np
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from app.errors import InvalidImage
from app.imaging.boundary import image_boundary

# JPEG-LS near-lossless too: its decoding is integer arithmetic the standard fixes, so every
# conforming decoder returns the same values (the tests compare with pyjpegls).
_JPEG = (JPEGLossless, JPEGLosslessSV1)
_JPEG_LS = (JPEGLSLossless, JPEGLSNearLossless)
SYNTAXES: tuple[UID, ...] = (*_JPEG, *_JPEG_LS, JPEG2000Lossless)


# SOF0-3, 5-7, 9-11, 13-15 (JPEG) and SOF55 (JPEG-LS)
_SOF_MARKERS = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE,
                          0xCF, 0xF7))  # fmt: skip


def jpeg_sof(frame: bytes) -> tuple[int, int, int, int | None] | None:
    """(precision, rows, columns, components) from a JPEG or JPEG-LS frame's SOF marker, or None
    when the frame has none before its data (components None when the segment is cut short)."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 9 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if marker in _SOF_MARKERS:
            rows, columns = struct.unpack(">HH", frame[position + 5 : position + 9])
            components = frame[position + 9] if position + 9 < len(frame) else None
            return frame[position + 4], rows, columns, components
        position += 2 + length
    return None


def decode_lossless(
    frame: bytes,
    syntax: UID,
    *,
    rows: int,
    columns: int,
    bits_allocated: int,
    bits_stored: int,
    threads: int = 1,
) -> np.ndarray | None:
    """The stored values of one frame of unsigned pixels in a lossless syntax, or None where
    pydicom should decode it (another syntax, or a JPEG / JPEG-LS codestream whose SOF disagrees
    with the header). A JPEG 2000 frame's main header is the caller's to check (one component of
    Bits Stored precision, unsigned, no offset, the 5/3 wavelet: `app.imaging.dicom`). Raises
    `InvalidImage` when the codec fails or returns other than `rows` x `columns` values."""
    import imagecodecs

    if syntax not in SYNTAXES or bits_allocated != (8 if bits_stored <= 8 else 16):
        return None
    decode: Callable[[bytes], np.ndarray]
    if syntax == JPEG2000Lossless:
        decode = partial(imagecodecs.jpeg2k_decode, numthreads=threads)
    elif (sof := jpeg_sof(frame)) is None or (sof[0], sof[3]) != (bits_stored, 1):
        return None
    else:
        decode = imagecodecs.jpeg8_decode if syntax in _JPEG else imagecodecs.jpegls_decode
    with image_boundary(f"the DICOM pixel data ({syntax.name}) could not be decoded"):
        values = decode(frame)
    expected = np.dtype(np.uint8 if bits_allocated == 8 else np.uint16)
    if values.shape != (rows, columns) or values.dtype != expected:
        raise InvalidImage(
            f"the DICOM pixel data ({syntax.name}) decoded to {values.dtype} {values.shape}, "
            f"not the header's {rows}x{columns} of {bits_allocated} bits"
        )
    return values
