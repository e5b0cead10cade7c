"""Byte-level reading of compressed DICOM frames: the size a JPEG, JPEG-LS or JPEG 2000 frame
declares (checked against Rows/Columns before anything is decoded), a JPEG 2000 main header
(levels, wavelet), and a JPEG 2000 frame decoded at a reduced resolution level."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile
from pydicom.encaps import generate_fragments

from app.errors import InvalidImage
from app.imaging.lossless import jpeg_sof


def frame_header_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS SOF or a JPEG 2000 SIZ marker; None if neither."""
    siz = fragment.find(b"\xff\x4f\xff\x51", 0, 4096)
    if siz >= 0 and len(fragment) >= siz + 24:
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", fragment[siz + 8 : siz + 24])
        return ysiz - y0, xsiz - x0
    sof = jpeg_sof(fragment)
    return None if sof is None else (sof[1], sof[2])


@dataclass(frozen=True)
class J2kMainHeader:
    """What a JPEG 2000 codestream's main header (SIZ, COD, COC) says about its first component."""

    rows: int
    columns: int
    offset: tuple[int, int]  # XOsiz, YOsiz
    components: int
    precision: int
    signed: bool
    decomposition_levels: int
    wavelet: str  # "5/3" (reversible) or "9/7" (irreversible), as SPcod/SPcoc's transformation says


def j2k_main_header(frame: bytes) -> J2kMainHeader | None:
    """The main header of a JPEG 2000 frame (a raw codestream or JP2-wrapped), or None when it has
    no readable SIZ and COD. Reads marker segments from SIZ up to the first tile-part (SOT)."""
    soc = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if soc < 0 or len(frame) < soc + 45:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[soc + 8 : soc + 24])
    (components,) = struct.unpack(">H", frame[soc + 40 : soc + 42])
    ssiz = frame[soc + 42]
    levels: int | None = None
    coc_levels: int | None = None
    transform = coc_transform = None
    position = soc + 2
    for _ in range(256):  # main headers have a handful of segments
        if position + 4 > len(frame) or frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0x90:  # SOT: the main header ends
            break
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if length < 2 or position + 2 + length > len(frame):
            return None
        if marker == 0x52 and length >= 12:  # COD: Scod, SGcod (4 bytes), then SPcod: levels,
            levels = frame[position + 9]  # code-block width, height and style, transformation
            transform = frame[position + 13]
        elif marker == 0x53:  # COC: Ccoc (1 byte below 257 components, else 2), Scoc, SPcoc
            index_bytes = 1 if components < 257 else 2
            index = int.from_bytes(frame[position + 4 : position + 4 + index_bytes], "big")
            if index == 0 and length >= 8 + index_bytes:
                coc_levels = frame[position + 5 + index_bytes]
                coc_transform = frame[position + 9 + index_bytes]
        position += 2 + length
    else:
        return None
    if coc_transform is not None:
        transform = coc_transform
    if levels is None or transform not in (0, 1):
        return None
    return J2kMainHeader(
        rows=ysiz - y0,
        columns=xsiz - x0,
        offset=(x0, y0),
        components=components,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        decomposition_levels=coc_levels if coc_levels is not None else levels,
        wavelet="5/3" if transform == 1 else "9/7",
    )


def single_frame(pixel_data: bytes) -> bytes:
    items = generate_fragments(pixel_data)
    next(items)  # the Basic Offset Table
    return b"".join(items)


def decode_j2k_at_level(frame: bytes, header: J2kMainHeader, level: int) -> np.ndarray:
    """The stored values of a JPEG 2000 frame at resolution level `level`, by OpenJPEG (Pillow's
    codec), refused unless exactly ceil(columns / 2**level) x ceil(rows / 2**level).

    Pillow's own `reduce` rounds the reduced size half up, which is one pixel short of OpenJPEG's
    ceil(W / 2**r) for some sides at r >= 2 (its decode then fails), so the tile is given the exact
    size. Pillow returns each value offset by 2**(precision - 1) when signed and shifted left to
    fill 8 or 16 bits; both are undone here."""
    expected = (-(-header.columns >> level), -(-header.rows >> level))
    with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as image:
        tile = image.tile[0]
        if not isinstance(tile.args, tuple) or len(tile.args) != 5:
            raise InvalidImage("the JPEG 2000 frame has no codestream Pillow can decode")
        codec, _, layers, fd, length = tile.args
        image._size = expected
        image.tile = [
            ImageFile._Tile(tile.codec_name, (0, 0, *expected), tile.offset,
                            (codec, level, layers, fd, length))
        ]  # fmt: skip
        image.load()
        decoded = np.asarray(image)
    if decoded.shape != (expected[1], expected[0]) or decoded.dtype.kind != "u":
        raise InvalidImage(
            f"the JPEG 2000 frame could not be decoded at resolution level {level} "
            f"(got {decoded.shape}, not {expected[1]}x{expected[0]})"
        )
    shift = 8 * decoded.dtype.itemsize - header.precision
    if not header.signed:
        unsigned: np.ndarray = decoded >> shift  # of the decoded unsigned type: no int32 copy
        return unsigned
    values = decoded.astype(np.int32)
    values >>= shift
    values -= 1 << (header.precision - 1)
    return values


def check_codestream_size(pixel_data: bytes, rows: int, columns: int) -> None:
    try:
        items = generate_fragments(pixel_data)
        next(items)  # the Basic Offset Table
        fragments = [f for f in items if f]
    except (ValueError, StopIteration, struct.error) as exc:
        raise InvalidImage("DICOM encapsulated pixel data has no readable frame") from exc
    if not fragments:
        raise InvalidImage("DICOM encapsulated pixel data has no frame")
    # libjpeg fills a cut-off JPEG / JPEG-LS stream with grey instead of failing; the end-of-image
    # marker (the fragment may carry one byte of padding after it) shows the stream is whole.
    if fragments[0].startswith(b"\xff\xd8") and b"\xff\xd9" not in fragments[-1][-3:]:
        raise InvalidImage("the compressed DICOM frame is truncated (no JPEG end-of-image marker)")
    size = frame_header_size(fragments[0])
    # RLE and unrecognised codestreams have no size to check; their decoders use Rows/Columns.
    # A JPEG height of 0 means "defined later by a DNL marker".
    if size is not None and (size[1] != columns or size[0] not in (rows, 0)):
        raise InvalidImage(
            f"the compressed frame is {size[1]}x{size[0]} but the DICOM header says "
            f"{columns}x{rows}"
        )
