"""Upload bytes -> a decoded, size-checked Pillow image (for DICOM, with its header's findings).

The format is detected from the bytes' signature, never from a Content-Type or file name (both are
client claims). Each known signature is one `ImageFormat` entry in `FORMATS`; a format with a
`decoder` is served, one without is recognised and refused with 415 and its own reason. DICOM is
one more decoder in that registry (`app.dicom`); it needs the model's `DicomPolicy`.

Everything here treats the input as hostile: dimensions are checked from the header before any
pixel is decompressed, truncated files are errors (Pillow's `LOAD_TRUNCATED_IMAGES` stays False),
and every exception the decoders raise becomes `InvalidImage` (422) instead of a 500.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pydicom.filereader
from PIL import Image
from pydicom.filereader import read_preamble

from app.dicom import DicomFindings, DicomPolicy, decode_dicom
from app.errors import ImageTooManyPixels, ImageTooSmall, InvalidImage, UnsupportedMediaType

logger = logging.getLogger(__name__)

SUPPORTED_HINT = "send a JPEG, PNG or DICOM image"


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


Decoder = Callable[[bytes, DecodeLimits, DicomPolicy | None], DecodedImage]


@dataclass(frozen=True)
class ImageFormat:
    """One recognisable file format: how to spot it and, if supported, how to decode it."""

    name: str
    matches: Callable[[bytes], bool]
    decoder: Decoder | None = None
    # Why a recognised format is refused; shown to the client with the 415.
    refusal: str = ""


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


def _pillow_decoder(pillow_format: str) -> Decoder:
    """A decoder that lets only the named Pillow plugin parse the bytes."""

    def decode(data: bytes, limits: DecodeLimits, _: DicomPolicy | None) -> DecodedImage:
        try:
            # `formats=` stops Pillow from trying its other plugins on bytes we already typed.
            image = Image.open(io.BytesIO(data), formats=[pillow_format])
            # `open` is lazy: only the header has been read, so this runs before decompression.
            check_dimensions(*image.size, limits)
            if pillow_format == "JPEG" and limits.jpeg_scale is not None:
                _scale_jpeg(image, limits.jpeg_scale(*image.size))
            image.load()
            # Parse EXIF now so a malformed block is a 422 here, not an error in preprocessing
            # (the result is cached on the image and reused by `exif_transpose`).
            image.getexif()
        except InvalidImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Pillow's own guard (in `open`) fired first: same meaning as ours.
            raise ImageTooManyPixels(f"image declares too many pixels: {exc}") from exc
        except DECODER_ERRORS as exc:
            raise InvalidImage(_describe(pillow_format, exc)) from exc
        except Exception as exc:
            # The decoder is C code parsing attacker-controlled bytes, and only its calls are in
            # this `try`: whatever it raises is a property of the input, so it is a 422, not a 500.
            # Logged loudly (type only, no image content) so new failure modes get noticed.
            logger.error("unexpected %s decoder error: %s", pillow_format, type(exc).__name__)
            raise InvalidImage(_describe(pillow_format, exc)) from exc
        return DecodedImage(image, pillow_format)

    return decode


def _scale_jpeg(image: Image.Image, denominator: int) -> None:
    """Have libjpeg decode at 1/denominator in the DCT domain (to ceil(W/d) x ceil(H/d)).

    Pillow's `draft` picks the largest of 8, 4, 2 that the requested size allows; asking for
    floor(W/d) x floor(H/d) makes that exactly d. The colour mode stays the file's own.
    """
    if denominator <= 1:
        return
    width, height = image.size
    image.draft(image.mode, (width // denominator, height // denominator))
    expected = (-(-width // denominator), -(-height // denominator))
    if image.size != expected:
        raise InvalidImage(
            f"the JPEG could not be decoded at 1/{denominator} scale ({width}x{height} became "
            f"{image.size[0]}x{image.size[1]})"
        )


def _describe(pillow_format: str, exc: BaseException) -> str:
    detail = str(exc).strip()[:200] or type(exc).__name__
    return f"the upload looks like {pillow_format} but could not be decoded: {detail}"


def _dicom_decoder(data: bytes, limits: DecodeLimits, policy: DicomPolicy | None) -> DecodedImage:
    if policy is None:
        raise UnsupportedMediaType(
            "this model's contract has no DICOM rendering rule; send a PNG or JPEG export"
        )
    rendered = decode_dicom(data, limits.max_pixels, limits.min_side, policy)
    return DecodedImage(rendered.image, "DICOM", rendered.findings)


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", lambda head: head.startswith(b"\xff\xd8\xff"), _pillow_decoder("JPEG")),
    ImageFormat("PNG", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"), _pillow_decoder("PNG")),
    # DICOM Part 10: a 128-byte preamble then "DICM" (files without the preamble are not Part 10).
    ImageFormat("DICOM", lambda head: head[128:132] == b"DICM", _dicom_decoder),
    ImageFormat("GIF", lambda head: head[:6] in (b"GIF87a", b"GIF89a")),
    ImageFormat("BMP", lambda head: head.startswith(b"BM")),
    ImageFormat("TIFF", lambda head: head[:4] in (b"II*\x00", b"MM\x00*")),
    ImageFormat("WebP", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP"),
    ImageFormat("PDF", lambda head: head.startswith(b"%PDF-")),
)

# The longest prefix any `matches` needs (DICOM's marker ends at byte 132).
_SIGNATURE_BYTES = 132


# Peak bytes per decoded pixel while an image of a mode is decoded and brought to 8-bit grey
# (`preprocessing.to_8bit`): the decoded image plus the grey copy made from it (CMYK goes through
# RGB inside Pillow; 16-bit adds the stretch's float64 slices). Measured with /proc VmHWM on
# 50-megapixel images; the README has the figures.
_PEAK_BYTES_PER_PIXEL = {
    "1": 2, "L": 1, "LA": 3, "P": 2, "RGB": 4, "RGBA": 5, "RGBX": 5, "CMYK": 9,
    "I;16": 4, "I;16L": 4, "I;16B": 4, "I;16N": 4,
}  # fmt: skip
_OTHER_MODES_PEAK = 12
# Buffers every decode holds whatever its size (libjpeg's, the resize's, the model input).
_DECODE_OVERHEAD_BYTES = 4 * 1024 * 1024
# DICOM (pydicom and the contract's rendering): an uncompressed file peaks near 6x its length
# (its pixels are in the upload: the parsed copy, the decoded array, the lookup and the 8-bit
# image); a compressed one is charged for the largest image the pixel limit admits (an RLE file
# of 49 megapixels peaked at 10 bytes per pixel).
_UNCOMPRESSED_DICOM_PEAK_PER_BYTE = 7
_DICOM_PEAK_BYTES_PER_PIXEL = 11


def estimate_decode_bytes(data: bytes, limits: DecodeLimits) -> int:
    """The memory decoding this upload will hold at its peak, from its header alone (0 when the
    header does not parse: decoding it will fail at once)."""
    fmt = detect_format(data)
    if fmt is None or fmt.decoder is None:
        return 0
    if fmt.name == "DICOM":
        if _uncompressed_dicom(data):
            return len(data) * _UNCOMPRESSED_DICOM_PEAK_PER_BYTE
        return limits.max_pixels * _DICOM_PEAK_BYTES_PER_PIXEL
    try:
        with Image.open(io.BytesIO(data), formats=[fmt.name]) as image:
            width, height = image.size
            mode = image.mode
    except Exception:  # whatever the header's problem is, decoding reports it properly
        return 0
    d = limits.jpeg_scale(width, height) if fmt.name == "JPEG" and limits.jpeg_scale else 1
    pixels = -(-width // d) * -(-height // d)
    return _DECODE_OVERHEAD_BYTES + pixels * _PEAK_BYTES_PER_PIXEL.get(mode, _OTHER_MODES_PEAK)


def _uncompressed_dicom(data: bytes) -> bool:
    """Whether a DICOM file's pixels are stored as they are (native, not deflated), from its file
    meta information alone."""
    try:
        stream = io.BytesIO(data)
        read_preamble(stream, False)
        syntax = pydicom.filereader._read_file_meta_info(stream).get("TransferSyntaxUID")
    except Exception:  # unreadable meta information: decoding refuses the file anyway
        return False
    return syntax is not None and not syntax.is_compressed and not syntax.is_deflated


def detect_format(data: bytes) -> ImageFormat | None:
    """The registered format whose signature the bytes carry, or None."""
    head = data[:_SIGNATURE_BYTES]
    return next((fmt for fmt in FORMATS if fmt.matches(head)), None)


def decode_upload(
    data: bytes, limits: DecodeLimits, dicom: DicomPolicy | None = None
) -> DecodedImage:
    """Decode an upload into a fully loaded Pillow image, refusing what the service cannot use.

    Raises `UnsupportedMediaType` (415) for empty, unknown or unsupported formats, and
    `InvalidImage` (422) for corrupt/truncated data, too many pixels, or too small an image, and
    its `NotIntendedUse` for a DICOM file outside the model's intended use. The image keeps its
    mode and EXIF (DICOM arrives already rendered to 8-bit grey by the contract's rule);
    `preprocessing.to_model_input` takes it from there.
    """
    if not data:
        raise UnsupportedMediaType(f"the upload is empty; {SUPPORTED_HINT}")
    fmt = detect_format(data)
    if fmt is None:
        raise UnsupportedMediaType(f"unrecognised file format; {SUPPORTED_HINT}")
    if fmt.decoder is None:
        reason = fmt.refusal or f"{fmt.name} is not supported; {SUPPORTED_HINT}"
        raise UnsupportedMediaType(reason)
    return fmt.decoder(data, limits, dicom)
