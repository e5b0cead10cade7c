"""Upload bytes -> a decoded, size-checked Pillow image (for DICOM, with its header's findings).

The format is detected from the bytes' signature, never from a Content-Type or file name (both are
client claims). Each known signature is one `ImageFormat` entry in `FORMATS`; a format with a
`decoder` is served, one without is recognised and refused with 415 and its own reason. DICOM is
one more decoder in that registry (`app.imaging.dicom`); it needs the model's `DicomPolicy`.

Everything here treats the input as hostile: dimensions are checked from the header before any
pixel is decompressed, truncated files are errors (Pillow's `LOAD_TRUNCATED_IMAGES` stays False),
and every exception the decoders raise becomes `InvalidImage` (422) instead of a 500: `open_upload`
and the `decode` it returns run inside the imaging stage's one boundary (`app.imaging.boundary`).

An upload is handled in two steps, so that its header is parsed once: `open_upload` detects the
format, reads and checks the header (for DICOM: parses and gates it) and says what decoding will
cost in memory; `OpenedUpload.decode` then decompresses the pixels.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from app.errors import ImageTooManyPixels, InvalidImage, UnsupportedMediaType
from app.imaging.boundary import guarded, image_boundary
from app.imaging.cost import dicom_decode_bytes, raster_decode_bytes
from app.imaging.dicom import DicomPolicy, open_dicom
from app.imaging.types import DECODER_ERRORS, DecodedImage, DecodeLimits, check_dimensions

logger = logging.getLogger(__name__)

SUPPORTED_HINT = "send a JPEG, PNG or DICOM image"


@dataclass(frozen=True)
class OpenedUpload:
    """An upload whose header was read and checked: its format, the memory its decode will hold
    at its peak, and the decode itself (call once)."""

    format: str
    decode_bytes: int
    decode: Callable[[], DecodedImage]


Opener = Callable[[bytes, DecodeLimits, DicomPolicy | None], OpenedUpload]


@dataclass(frozen=True)
class ImageFormat:
    """One recognisable file format: how to spot it and, if supported, how to open it."""

    name: str
    matches: Callable[[bytes], bool]
    opener: Opener | None = None
    # Why a recognised format is refused; shown to the client with the 415.
    refusal: str = ""


def _pillow_opener(pillow_format: str) -> Opener:
    """An opener that lets only the named Pillow plugin parse the bytes."""

    def failure(exc: BaseException) -> InvalidImage:
        if isinstance(exc, InvalidImage):
            return exc
        if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
            # Pillow's own guard (in `open`) fired first: same meaning as ours.
            return ImageTooManyPixels(f"image declares too many pixels: {exc}")
        if not isinstance(exc, DECODER_ERRORS):
            # The decoder is C code parsing attacker-controlled bytes, and only its calls are in
            # the `try`s: whatever it raises is a property of the input, so it is a 422, not a 500.
            # Logged loudly (type only, no image content) so new failure modes get noticed.
            logger.error("unexpected %s decoder error: %s", pillow_format, type(exc).__name__)
        return InvalidImage(_describe(pillow_format, exc))

    def open_(data: bytes, limits: DecodeLimits, _: DicomPolicy | None) -> OpenedUpload:
        try:
            # `formats=` stops Pillow from trying its other plugins on bytes we already typed.
            image = Image.open(io.BytesIO(data), formats=[pillow_format])
            # `open` is lazy: only the header has been read, so this runs before decompression.
            check_dimensions(*image.size, limits)
            denominator = 1
            if pillow_format == "JPEG" and limits.jpeg_scale is not None:
                denominator = limits.jpeg_scale(*image.size)
        except Exception as exc:
            raise failure(exc) from exc
        width, height = image.size
        cost = raster_decode_bytes(-(-width // denominator), -(-height // denominator), image.mode)

        def decode() -> DecodedImage:
            try:
                _scale_jpeg(image, denominator)
                image.load()
                # Parse EXIF now so a malformed block is a 422 here, not an error in
                # preprocessing (the result is cached on the image and reused by
                # `exif_transpose`).
                image.getexif()
            except Exception as exc:
                raise failure(exc) from exc
            return DecodedImage(image, pillow_format, stored_size=(width, height))

        return OpenedUpload(pillow_format, cost, decode)

    return open_


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


def _dicom_opener(data: bytes, limits: DecodeLimits, policy: DicomPolicy | None) -> OpenedUpload:
    if policy is None:
        raise UnsupportedMediaType(
            "this model's contract has no DICOM rendering rule; send a PNG or JPEG export"
        )
    opened = open_dicom(data, limits.max_pixels, limits.min_side, policy)
    cost = dicom_decode_bytes(len(data), opened.pixels_stored_as_is, limits.max_pixels)

    def decode() -> DecodedImage:
        rendered = opened.render(policy)
        approximation = rendered.approximation
        return DecodedImage(
            rendered.image,
            "DICOM",
            rendered.findings,
            stored_size=approximation.stored_size if approximation is not None else None,
            approximation=approximation,
        )

    return OpenedUpload("DICOM", cost, decode)


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", lambda head: head.startswith(b"\xff\xd8\xff"), _pillow_opener("JPEG")),
    ImageFormat("PNG", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"), _pillow_opener("PNG")),
    # DICOM Part 10: a 128-byte preamble then "DICM" (files without the preamble are not Part 10).
    ImageFormat("DICOM", lambda head: head[128:132] == b"DICM", _dicom_opener),
    ImageFormat("GIF", lambda head: head[:6] in (b"GIF87a", b"GIF89a")),
    ImageFormat("BMP", lambda head: head.startswith(b"BM")),
    ImageFormat("TIFF", lambda head: head[:4] in (b"II*\x00", b"MM\x00*")),
    ImageFormat("WebP", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP"),
    ImageFormat("PDF", lambda head: head.startswith(b"%PDF-")),
)

# The longest prefix any `matches` needs (DICOM's marker ends at byte 132).
_SIGNATURE_BYTES = 132


def detect_format(data: bytes) -> ImageFormat | None:
    """The registered format whose signature the bytes carry, or None."""
    head = data[:_SIGNATURE_BYTES]
    return next((fmt for fmt in FORMATS if fmt.matches(head)), None)


def open_upload(
    data: bytes, limits: DecodeLimits, dicom: DicomPolicy | None = None
) -> OpenedUpload:
    """Detect the format and read the header, refusing what the service cannot use before any
    pixel is decompressed.

    Raises `UnsupportedMediaType` (415) for empty, unknown or unsupported formats, and
    `InvalidImage` (422) for a corrupt header, too many pixels or too small an image, and its
    `NotIntendedUse` for a DICOM file outside the model's intended use. Nothing else escapes,
    here or from the returned `decode`: any other exception a parser or decoder raises becomes
    `InvalidImage` naming its type (`app.imaging.boundary`).
    """
    if not data:
        raise UnsupportedMediaType(f"the upload is empty; {SUPPORTED_HINT}")
    fmt = detect_format(data)
    if fmt is None:
        raise UnsupportedMediaType(f"unrecognised file format; {SUPPORTED_HINT}")
    if fmt.opener is None:
        reason = fmt.refusal or f"{fmt.name} is not supported; {SUPPORTED_HINT}"
        raise UnsupportedMediaType(reason)
    with image_boundary(f"the upload looks like {fmt.name} but its header could not be read"):
        opened = fmt.opener(data, limits, dicom)
    # The one boundary (`app.imaging.boundary`) around the decode as well, whatever the format.
    decode = guarded(f"the upload looks like {fmt.name} but could not be decoded")(opened.decode)
    return OpenedUpload(opened.format, opened.decode_bytes, decode)


def decode_upload(
    data: bytes, limits: DecodeLimits, dicom: DicomPolicy | None = None
) -> DecodedImage:
    """Decode an upload into a fully loaded Pillow image: `open_upload`, then its decode.

    Besides `open_upload`'s refusals, a corrupt or truncated pixel stream is `InvalidImage`. The
    image keeps its mode and EXIF (DICOM arrives already rendered to 8-bit grey by the contract's
    rule); `preprocessing.to_model_input` takes it from there.
    """
    return open_upload(data, limits, dicom).decode()
