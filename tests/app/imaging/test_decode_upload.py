"""decode_upload: every JPEG/PNG form a real upload takes, and every way bytes can be refused."""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from app.contract import Preprocessing
from app.errors import (
    ImageTooManyPixels,
    ImageTooSmall,
    InvalidImage,
    UnsupportedMediaType,
)
from app.imaging.formats import DecodeLimits, decode_upload, detect_format
from app.imaging.preprocessing import to_model_input
from tests.support.testkit import DICOM_RENDERING, encode, xray_like

LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64)
SPEC = Preprocessing(height=224, width=224, dicom=DICOM_RENDERING)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims the given size, with one tiny (invalid-for-that-size) IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its SOF dimensions rewritten."""
    data = bytearray(encode(xray_like((80, 80)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ---- every supported form decodes, with the right size and content --------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "save_kwargs"),
    [
        ("JPEG", "L", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "RGB", {"progressive": True, "quality": 90}),
        ("JPEG", "L", {"progressive": True}),
        ("PNG", "L", {}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "LA", {}),
        ("PNG", "P", {}),
        ("PNG", "1", {}),
    ],
)
def test_every_8bit_form_decodes_to_the_same_picture(fmt, mode, save_kwargs):
    source = xray_like((300, 260))
    data = encode(source.convert(mode), fmt, **save_kwargs)

    image = decode_upload(data, LIMITS).image

    assert image.size == (300, 260)
    assert image.format == fmt
    x = to_model_input(image, SPEC)
    reference = to_model_input(source, SPEC)
    # JPEG is lossy and 1-bit is thresholded: compare loosely, but far tighter than the
    # difference between two unrelated images.
    tolerance = 0.5 if mode == "1" else 0.06
    assert np.abs(x - reference).mean() < tolerance
    if mode != "1":
        assert np.corrcoef(x.ravel(), reference.ravel())[0, 1] > 0.95


def test_progressive_jpeg_is_really_progressive():
    data = encode(xray_like(), "JPEG", progressive=True)
    image = decode_upload(data, LIMITS).image
    assert image.info.get("progressive") or image.info.get("progression")


def test_cmyk_jpeg_keeps_its_mode_until_preprocessing():
    image = decode_upload(encode(xray_like().convert("CMYK"), "JPEG"), LIMITS).image
    assert image.mode == "CMYK"
    assert to_model_input(image, SPEC).shape == (1, 224, 224, 1)


def test_16bit_png_decodes_with_full_depth_and_is_stretched():
    values = np.linspace(1000, 3000, 100 * 120, dtype=np.uint16).reshape(100, 120)
    data = encode(Image.fromarray(values), "PNG")

    image = decode_upload(data, LIMITS).image

    assert image.mode.startswith("I")  # not silently truncated to 8 bits
    assert int(np.asarray(image).max()) == 3000
    x = to_model_input(
        image, Preprocessing(height=100, width=120, resize_filter="nearest", dicom=DICOM_RENDERING)
    )
    assert x.min() == pytest.approx(0.0)
    assert x.max() == pytest.approx(1.0)


def test_palette_png_with_transparency_decodes_and_alpha_is_dropped():
    palette_image = xray_like().convert("P")
    data = encode(palette_image, "PNG", transparency=0)

    image = decode_upload(data, LIMITS).image

    assert image.mode == "P"
    assert "transparency" in image.info
    # Transparent pixels keep their palette colour (no compositing onto black or white).
    expected = to_model_input(palette_image.convert("RGB"), SPEC)
    np.testing.assert_allclose(to_model_input(image, SPEC), expected, atol=1e-6)


@pytest.mark.parametrize(("orientation", "bright_side"), [(6, "bottom"), (8, "top"), (3, "left")])
def test_exif_orientation_is_applied(orientation, bright_side):
    # Stored upright landscape: left half dark, right half bright.
    pixels = np.zeros((200, 300), dtype=np.uint8)
    pixels[:, 150:] = 250
    stored = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)

    image = decode_upload(data, LIMITS).image
    spec = Preprocessing(height=300, width=300, resize_filter="nearest", dicom=DICOM_RENDERING)
    x = to_model_input(image, spec)[0, :, :, 0]

    halves = {
        "top": x[:150].mean(),
        "bottom": x[150:].mean(),
        "left": x[:, :150].mean(),
        "right": x[:, 150:].mean(),
    }
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[bright_side]
    assert halves[bright_side] > 0.9
    assert halves[opposite] < 0.1


def test_exif_rotation_swaps_the_displayed_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_upload(encode(xray_like((300, 200)), "JPEG", exif=exif.tobytes()), LIMITS).image
    assert ImageOps.exif_transpose(image).size == (200, 300)


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (encode(xray_like(), "GIF"), "GIF is not supported"),
        (encode(xray_like(), "BMP"), "BMP"),
        (encode(xray_like(), "TIFF"), "TIFF"),
        (encode(xray_like(), "WEBP"), "WebP"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b"patient: John Doe\nthis is not an image\n" * 10, "unrecognised"),
        (b"", "empty"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00" * 50, "no DICOM rendering rule"),
    ],
    ids=["gif", "bmp", "tiff", "webp", "pdf", "text", "empty", "dicom-without-a-rule"],
)
def test_unsupported_formats_are_415_with_a_reason(data, fragment):
    with pytest.raises(UnsupportedMediaType) as excinfo:
        decode_upload(data, LIMITS)
    assert fragment in excinfo.value.message
    assert excinfo.value.status_code == 415


def test_format_is_detected_from_bytes_only():
    assert detect_format(encode(xray_like(), "PNG")).name == "PNG"
    assert detect_format(encode(xray_like(), "JPEG")).name == "JPEG"
    assert detect_format(b"\x00" * 128 + b"DICM").name == "DICOM"
    assert detect_format(b"\x00" * 200) is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_images_are_422_not_silently_accepted(fmt, keep):
    data = encode(xray_like((400, 400)), fmt)
    with pytest.raises(InvalidImage):
        decode_upload(data[: int(len(data) * keep)], LIMITS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_checksum_is_422():
    data = bytearray(encode(xray_like(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(InvalidImage):
        decode_upload(bytes(data), LIMITS)


def test_jpeg_magic_followed_by_garbage_is_422():
    with pytest.raises(InvalidImage):
        decode_upload(b"\xff\xd8\xff\xe0" + b"\x13\x37" * 500, LIMITS)


@pytest.mark.parametrize("size", [(63, 300), (300, 63), (10, 10)])
def test_images_below_the_minimum_side_are_422(size):
    with pytest.raises(ImageTooSmall):
        decode_upload(encode(xray_like(size), "PNG"), LIMITS)


def test_minimum_side_is_inclusive():
    assert decode_upload(encode(xray_like((64, 64)), "PNG"), LIMITS).image.size == (64, 64)


@pytest.mark.parametrize(
    "data",
    [
        png_header_only(9_000, 9_000),  # above our limit, below Pillow's
        png_header_only(100_000, 100_000),  # above Pillow's own hard limit too
        jpeg_claiming(60_000, 60_000),
    ],
    ids=["png-81MP", "png-10GP", "jpeg-3.6GP"],
)
def test_pixel_bombs_are_refused_from_the_header(data):
    with pytest.raises(ImageTooManyPixels):
        decode_upload(data, LIMITS)


def test_pixel_limit_is_checked_before_decompression():
    # A perfectly valid image, refused only because of the configured limit: had the pixels been
    # decoded first the error would be the same, so also check it is the limit that fires.
    data = encode(xray_like((300, 260)), "PNG")
    with pytest.raises(ImageTooManyPixels, match="78000 pixels"):
        decode_upload(data, DecodeLimits(max_pixels=70_000, min_side=64))
    assert decode_upload(data, DecodeLimits(max_pixels=78_000, min_side=64)).image.size == (
        300,
        260,
    )


def test_fuzzed_uploads_never_escape_as_anything_but_domain_errors():
    """Random, truncated and bit-flipped JPEG/PNG bytes: a decoded image or a 415/422, always."""
    rng = random.Random(20240601)
    seeds = [
        encode(xray_like((96, 80)), "JPEG"),
        encode(xray_like((96, 80)), "JPEG", progressive=True),
        encode(xray_like((96, 80)), "PNG"),
        encode(xray_like((96, 80)).convert("P"), "PNG", transparency=3),
        encode(Image.fromarray(np.arange(96 * 80, dtype=np.uint16).reshape(80, 96)), "PNG"),
    ]
    cases: list[bytes] = []
    for seed in seeds:
        for _ in range(40):
            mutated = bytearray(seed)
            for _ in range(rng.randint(1, 12)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            cases.append(bytes(mutated))
        cases.extend(seed[:cut] for cut in sorted(rng.sample(range(1, len(seed)), 20)))
        cases.append(seed[:8] + bytes(rng.getrandbits(8) for _ in range(300)))
    outcomes = {"decoded": 0, "refused": 0}
    for data in cases:
        try:
            image = decode_upload(data, LIMITS).image
        except (InvalidImage, UnsupportedMediaType):
            outcomes["refused"] += 1
        else:
            # Whatever survives decoding must also survive preprocessing.
            assert to_model_input(image, SPEC).shape == (1, 224, 224, 1)
            outcomes["decoded"] += 1
    # Both branches must really be exercised, or the test proves nothing.
    assert outcomes["refused"] > len(cases) // 4
    assert outcomes["decoded"] > 0
    assert sum(outcomes.values()) == len(cases)
