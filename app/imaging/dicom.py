"""DICOM Part-10 upload -> the 8-bit grey image the model contract prescribes, or a refusal.

Three stages, each refusing what it cannot vouch for:

1. Parse the header. A deflated data set is inflated here with a ceiling on its size (pydicom's
   own reader would inflate a 32 MiB upload into gigabytes).
2. Gate on the header alone, before any pixel is decoded: the model's intended use (`IntendedUse`
   in the contract: modality, SOP class, body part, view position, age), one frame of one grey
   sample, integer pixels, and the same pixel-count and side limits as JPEG/PNG. The compressed
   frame's own dimensions must agree with Rows/Columns, so a codestream cannot allocate more than
   the header admitted.
3. Decode the pixels (pydicom with the pylibjpeg plugins; a large JPEG 2000 frame at the reduced
   resolution level of the contract's `Jpeg2000Reduction`, with Pillow's OpenJPEG; a lossless
   JPEG, JPEG-LS or JPEG 2000 frame with imagecodecs, `app.imaging.lossless`) and render them
   with the contract's `DicomRendering`: modality LUT, VOI, polarity, 8 bits. The pipeline is
   evaluated once per possible stored value into a lookup table, then applied with one indexing
   pass, so a 12-bit 2500x2048 image never exists as a float64 copy.

Patient data: nothing read from the header is logged or put into an error message except coded,
non-identifying attributes that explain a refusal (Modality, SOP class, Body Part Examined, View
Position, Photometric Interpretation, bit depths), and those only after sanitising. The response
echoes the three instance UIDs, modality, view position and the applied window, nothing else.
The training side renders independently (`training.dicom`); a test proves the two agree.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pydicom
import pydicom.config
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from app.contract import DicomRendering, IntendedUse
from app.errors import (
    ImageTooManyPixels,
    ImageTooSmall,
    InvalidImage,
    NotIntendedUse,
    OutsideTrainingPopulation,
)
from app.imaging.boundary import guarded, image_boundary
from app.imaging.lossless import SYNTAXES as LOSSLESS_SYNTAXES
from app.imaging.lossless import decode_lossless, jpeg_sof
from app.imaging.preprocessing import WaveletApproximation

# pydicom reports invalid header values through `warnings` and its logger, quoting the value: that
# would put a patient's name into the service's stderr. Validation is ours, so silence both.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").propagate = False
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Faster decoders where pydicom's default is slow (lossless both ways: identical pixels): on a
# 2500x2048 12-bit frame, pylibjpeg-rle against pydicom's own Python RLE, and CharLS (pyjpegls)
# against libjpeg for JPEG-LS, about 4x faster each (measured 2026-11, docs/PERFORMANCE.md).
_PREFERRED_PLUGINS: dict[UID, str] = {
    RLELossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_SAFE_CODE = re.compile(r"^[A-Za-z0-9 _\-.]{1,64}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_DATA = 0x7FE00010

# Every transfer syntax the decoders read (each proven by the tests, exact or within the lossy
# codecs' error); the C-STORE listener offers exactly these for CR and DX.
DECODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)


@dataclass(frozen=True)
class DicomPolicy:
    """What the DICOM decoder needs from the model contract and the service settings."""

    rendering: DicomRendering
    intended_use: IntendedUse
    refuse_outside_population: bool = False
    # Ceiling for an inflated (Deflated Explicit VR Little Endian) data set, in bytes.
    max_inflated_bytes: int = 256 * 1024 * 1024
    # The contract's JPEG 2000 reduction (`preprocessing.j2k_reduction_level` bound to the model's
    # contract): stored width, height, the codestream's decomposition levels and wavelet -> the
    # resolution level r to decode at (0: full resolution). None: always full resolution.
    j2k_level: Callable[[int, int, int, str], int] | None = None
    # Threads one JPEG 2000 decode may use (OpenJPEG; `app.imaging.lossless`).
    codec_threads: int = 1


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


def _code(value: object) -> str:
    """A coded header value, fit to quote in an error message (or a placeholder)."""
    text = str(value).strip() if value is not None else ""
    return text.upper() if _SAFE_CODE.match(text) else "an unrecognised value"


def _uid(dataset: Dataset, keyword: str) -> str | None:
    value = str(dataset.get(keyword, "") or "").strip().rstrip("\x00")
    return value if len(value) <= 64 and _UID.match(value) else None


# -- 1. parsing --------------------------------------------------------------------------------


def read_part10(
    data: bytes, max_inflated_bytes: int, *, stop_before_pixels: bool = False
) -> FileDataset:
    """Parse a PS3.10 file (its preamble, file meta and data set), optionally up to its pixel
    data. A deflated data set is inflated here under `max_inflated_bytes` (pydicom's own reader
    would inflate a 32 MiB upload into gigabytes): `ImageTooManyPixels` past it. The STOW-RS and
    C-STORE intakes read headers with it too."""
    stream = io.BytesIO(data)
    preamble = read_preamble(stream, False)
    # pydicom's meta reader is the one `dcmread` uses; it leaves `stream` at the data set.
    file_meta: FileMetaDataset = pydicom.filereader._read_file_meta_info(stream)
    syntax = file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InvalidImage("DICOM file meta information has no Transfer Syntax UID")
    if syntax != DeflatedExplicitVRLittleEndian:
        stream.seek(0)
        return pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(stream.read(), max_inflated_bytes)
    if inflater.unconsumed_tail:
        raise ImageTooManyPixels(
            f"the deflated DICOM data set inflates past {max_inflated_bytes} bytes"
        )
    body = read_dataset(
        io.BytesIO(inflated),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=(lambda tag, vr, length: tag == _PIXEL_DATA) if stop_before_pixels else None,
    )
    return FileDataset(
        "", body, preamble=preamble, file_meta=file_meta, is_implicit_VR=False,
        is_little_endian=True,
    )  # fmt: skip


def _read(data: bytes, policy: DicomPolicy) -> FileDataset:
    return read_part10(data, policy.max_inflated_bytes)


# -- 2. gating ---------------------------------------------------------------------------------


def _gate_intended_use(ds: FileDataset, rules: IntendedUse) -> str:
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise NotIntendedUse("the upload is a DICOMDIR (a media index), not an image")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        raise NotIntendedUse(
            "the DICOM file has no Modality; only projection radiographs "
            f"({', '.join(rules.modalities)}) are accepted"
        )
    if modality not in rules.modalities:
        raise NotIntendedUse(
            f"Modality {_code(modality)} is not a projection radiograph; this model accepts "
            f"{', '.join(rules.modalities)} chest X-rays only"
        )
    if sop_class not in rules.sop_class_uids:
        accepted = ", ".join(rules.sop_class_uids.values())
        raise NotIntendedUse(
            f"SOP Class UID {_code(sop_class)} is not one this model accepts ({accepted})"
        )
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part not in rules.body_parts:
        raise NotIntendedUse(
            f"Body Part Examined is {_code(body_part)}, not a chest ({', '.join(rules.body_parts)})"
        )
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view in rules.refused_view_positions:
        raise NotIntendedUse(
            f"View Position {_code(view)} is a lateral view; this model reads frontal (PA/AP) "
            "chest X-rays only"
        )
    return modality


def intended_use_refusal(ds: Dataset, rules: IntendedUse) -> str | None:
    """None when a header describes an image the model was made for (modality, SOP class, body
    part, view), else the reason, fit to show (coded values only). For the DICOM intakes, which
    gate on the header before they queue an instance; the pixels are checked when it is read."""
    try:
        _gate_intended_use(ds, rules)  # type: ignore[arg-type]
    except NotIntendedUse as exc:
        return exc.message
    return None


def _gate_pixels(ds: FileDataset, limits_max_pixels: int, min_side: int) -> None:
    if "PixelData" not in ds:
        other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
        detail = f" (it has {other}, which X-ray detectors do not produce)" if other else ""
        raise NotIntendedUse(f"the DICOM file has no integer pixel data{detail}")
    frames = ds.get("NumberOfFrames", 1)
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise InvalidImage("DICOM Number of Frames is not a number") from exc
    if n_frames != 1:
        raise NotIntendedUse(
            f"the DICOM file has {n_frames} frames; only single-frame radiographs are accepted"
        )
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric not in _GREY:
        raise NotIntendedUse(
            f"the DICOM image is colour ({_code(photometric)}, {_code(samples)} samples per "
            "pixel); only greyscale MONOCHROME1/MONOCHROME2 radiographs are accepted"
        )
    rows, columns = ds.get("Rows"), ds.get("Columns")
    bits_allocated, bits_stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if not all(isinstance(v, int) for v in (rows, columns, bits_allocated, bits_stored)):
        raise InvalidImage("the DICOM header lacks Rows, Columns, Bits Allocated or Bits Stored")
    assert isinstance(rows, int) and isinstance(columns, int)
    if rows * columns > limits_max_pixels:
        raise ImageTooManyPixels(
            f"image declares {columns}x{rows} = {rows * columns} pixels, "
            f"above the limit of {limits_max_pixels}"
        )
    if min(rows, columns) < min_side:
        raise ImageTooSmall(f"image is {columns}x{rows}; both sides must be at least {min_side} px")
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise InvalidImage(
            f"unsupported DICOM pixel depth: Bits Allocated {_code(bits_allocated)}, "
            f"Bits Stored {_code(bits_stored)} (8- or 16-bit integer pixels are accepted)"
        )
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        _check_codestream_size(ds.PixelData, rows, columns)
    else:
        expected = rows * columns * (bits_allocated // 8)
        if len(ds.PixelData) < expected:
            raise InvalidImage(
                f"DICOM pixel data is truncated: {len(ds.PixelData)} bytes for a {columns}x{rows} "
                f"image of {bits_allocated}-bit pixels ({expected} expected)"
            )


def _frame_header_size(fragment: bytes) -> tuple[int, int] | None:
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


def _single_frame(pixel_data: bytes) -> bytes:
    items = generate_fragments(pixel_data)
    next(items)  # the Basic Offset Table
    return b"".join(items)


def _decode_j2k_at_level(frame: bytes, header: J2kMainHeader, level: int) -> np.ndarray:
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


def _check_codestream_size(pixel_data: bytes, rows: int, columns: int) -> None:
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
    size = _frame_header_size(fragments[0])
    # RLE and unrecognised codestreams have no size to check; their decoders use Rows/Columns.
    # A JPEG height of 0 means "defined later by a DNL marker".
    if size is not None and (size[1] != columns or size[0] not in (rows, 0)):
        raise InvalidImage(
            f"the compressed frame is {size[1]}x{size[0]} but the DICOM header says "
            f"{columns}x{rows}"
        )


# -- age ---------------------------------------------------------------------------------------


def _parse_da(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """Age in years from Patient's Age (AS: 005Y, 018M, 003W, 012D), else from Patient's Birth
    Date and the study (or acquisition, or content) date; None when neither is usable."""
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{3})([DWMY])", age)
    if match:
        days_per_unit = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}[match.group(2)]
        return int(match.group(1)) * days_per_unit / 365.25
    birth = _parse_da(ds.get("PatientBirthDate"))
    seen = next(
        (
            d
            for d in (_parse_da(ds.get(k)) for k in ("StudyDate", "AcquisitionDate", "ContentDate"))
            if d is not None
        ),
        None,
    )
    if birth is None or seen is None or seen < birth:
        return None
    return (seen - birth).days / 365.25


def _population_warning(ds: Dataset, policy: DicomPolicy) -> str | None:
    population = policy.intended_use.training_population
    age = patient_age_years(ds)
    if age is None or population.age_years_min <= age < population.age_years_max:
        return None
    # The age itself is never repeated: not here, not in logs.
    message = (
        f"the patient's age is outside the training population ({population.description}); "
        "the model's accuracy for this patient is unknown"
    )
    if policy.refuse_outside_population:
        raise OutsideTrainingPopulation(message)
    return message


# -- 3. rendering ------------------------------------------------------------------------------


def _lut_values(item: Dataset, signed: bool) -> tuple[np.ndarray, int, int]:
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


def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        table, first, _ = _lut_values(ds.ModalityLUTSequence[0], _signed(ds))
        index = np.clip(stored - first, 0, table.size - 1).astype(np.intp)
        mapped: np.ndarray = table[index]
        return mapped
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise InvalidImage("the DICOM Rescale Slope/Intercept are not finite numbers")
    return stored * slope + intercept


def _signed(ds: Dataset) -> bool:
    return bool(ds.get("PixelRepresentation", 0) == 1)


def _first(value: object, index: int) -> float | None:
    values = list(value) if isinstance(value, pydicom.multival.MultiValue | list) else [value]
    if index >= len(values):
        return None
    try:
        number = float(values[index])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window_function(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray | None:
    if function == "SIGMOID":
        return None if w <= 0 else 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return None if w <= 0 else np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function == "LINEAR":
        if w == 1:  # the standard's limit case: a threshold at c - 0.5 (no division by zero)
            return np.where(x > c - 0.5, 1.0, 0.0)
        return None if w < 1 else np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    return None


def _voi(
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
            c = _first(ds.WindowCenter, rule.window_index)
            w = _first(ds.WindowWidth, rule.window_index)
            function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
            if c is not None and w is not None:
                v = _window_function(x, c, w, function)
                if v is not None:
                    return v, AppliedWindow("window", c, w, function)
            notes.append("the DICOM window (Window Center/Width) is unusable and was ignored")
        elif source == "voi_lut_sequence" and len(ds.get("VOILUTSequence", None) or []):
            table, first, bits = _lut_values(ds.VOILUTSequence[0], _signed(ds))
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


def _padding_mask(stored_domain: np.ndarray, ds: Dataset) -> np.ndarray:
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
    padding = _padding_mask(domain, ds)

    def present() -> np.ndarray:
        occurs = np.bincount(index.ravel(), minlength=n_values) > 0
        return occurs & ~padding if rule.full_range_excludes_padding else occurs

    notes: list[str] = []
    x = _modality(domain, ds)
    v, window = _voi(x, present, ds, rule, notes)
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


# -- the decoder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedDicom:
    image: Image.Image
    findings: DicomFindings
    # The JPEG 2000 frame was decoded at a reduced resolution level (`Jpeg2000Reduction`).
    approximation: WaveletApproximation | None = None


class OpenedDicom:
    """A DICOM upload whose header was parsed and gated (stages 1 and 2); `render` runs stage 3.

    Splitting here lets the caller reserve decode memory knowing the transfer syntax, without
    parsing the header a second time."""

    def __init__(self, ds: FileDataset, modality: str, population_warning: str | None) -> None:
        self._ds = ds
        self._modality = modality
        self._population_warning = population_warning

    @property
    def transfer_syntax(self) -> UID:
        syntax: UID = self._ds.file_meta.TransferSyntaxUID
        return syntax

    @property
    def pixels_stored_as_is(self) -> bool:
        """Whether the pixels are native in the upload (neither compressed nor deflated)."""
        syntax = self.transfer_syntax
        return not syntax.is_compressed and not syntax.is_deflated

    @guarded("the DICOM image could not be decoded")
    def render(self, policy: DicomPolicy) -> RenderedDicom:
        """Decode the pixels and render them by the contract's rule; whatever goes wrong on the
        way is `InvalidImage` (`app.imaging.boundary`)."""
        ds = self._ds
        syntax = self.transfer_syntax
        reduced = self._reduced_j2k(policy)
        stored, approximation = reduced if reduced is not None else (None, None)
        if stored is None:
            stored = self._lossless_values(policy)
        if stored is None:
            plugin = _PREFERRED_PLUGINS.get(syntax)
            if plugin is not None and plugin in get_decoder(syntax).available_plugins:
                ds.pixel_array_options(decoding_plugin=plugin)
            with image_boundary(f"the DICOM pixel data ({syntax.name}) could not be decoded"):
                stored = ds.pixel_array
            if stored.shape != (ds.Rows, ds.Columns):
                raise InvalidImage(
                    f"the decoded DICOM pixels have shape {stored.shape}, not the header's "
                    f"{ds.Rows}x{ds.Columns}"
                )
        with image_boundary("the DICOM image could not be rendered"):
            grey, window, notes = render_dicom(ds, stored, policy.rendering)
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        population = [self._population_warning] if self._population_warning else []
        findings = DicomFindings(
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            modality=self._modality,
            view_position=view if view and _SAFE_CODE.match(view) else None,
            transfer_syntax=str(syntax),
            window=window,
            warnings=[*notes, *population],
            manufacturer=str(ds.get("Manufacturer", "") or "").strip()[:64] or None,
        )
        return RenderedDicom(Image.fromarray(grey), findings, approximation)

    def _lossless_values(self, policy: DicomPolicy) -> np.ndarray | None:
        """The stored values of a lossless frame by `app.imaging.lossless` (imagecodecs, off the
        interpreter lock), or None where pydicom decodes it."""
        ds = self._ds
        syntax = self.transfer_syntax
        if syntax not in LOSSLESS_SYNTAXES or _signed(ds):
            return None
        with image_boundary("the DICOM encapsulated pixel data has no readable frame"):
            frame = _single_frame(ds.PixelData)
        bits_stored = int(ds.BitsStored)
        if syntax == JPEG2000Lossless:
            header = j2k_main_header(frame)
            if header is None or (
                header.components,
                header.precision,
                header.signed,
                header.offset,
                header.wavelet,
            ) != (1, bits_stored, False, (0, 0), "5/3"):
                return None
        return decode_lossless(
            frame,
            syntax,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            bits_allocated=int(ds.BitsAllocated),
            bits_stored=bits_stored,
            threads=policy.codec_threads,
        )

    def _reduced_j2k(self, policy: DicomPolicy) -> tuple[np.ndarray, WaveletApproximation] | None:
        """The stored values at the contract's reduced resolution level and what they are, or
        None where the rule does not apply (`Jpeg2000Reduction`: the frame is decoded in full)."""
        ds = self._ds
        syntax = self.transfer_syntax
        if policy.j2k_level is None or syntax not in (JPEG2000Lossless, JPEG2000):
            return None
        with image_boundary("the DICOM encapsulated pixel data has no readable frame"):
            frame = _single_frame(ds.PixelData)
        header = j2k_main_header(frame)
        if (
            header is None
            or header.components != 1
            or header.offset != (0, 0)
            or header.precision != int(ds.BitsStored)
            or header.signed != _signed(ds)
        ):
            return None
        level = policy.j2k_level(
            int(ds.Columns), int(ds.Rows), header.decomposition_levels, header.wavelet
        )
        if level <= 0:
            return None
        with image_boundary(f"the DICOM pixel data ({syntax.name}) could not be decoded"):
            values = _decode_j2k_at_level(frame, header, level)
        dtype = f"{'i' if header.signed else 'u'}{int(ds.BitsAllocated) // 8}"
        stored_size = (int(ds.Columns), int(ds.Rows))
        return values.astype(dtype), WaveletApproximation(level, header.wavelet, stored_size)


def use_codec_threads(threads: int) -> None:
    """Let each JPEG 2000 decode run on `threads` threads. imagecodecs is told per call
    (`DicomPolicy.codec_threads`); Pillow's OpenJPEG, which decodes the reduced frames, reads
    `OPJ_NUM_THREADS` whenever it creates a decoder, so this sets it for the process."""
    os.environ["OPJ_NUM_THREADS"] = str(max(1, threads))


def open_dicom(data: bytes, max_pixels: int, min_side: int, policy: DicomPolicy) -> OpenedDicom:
    """Parse and gate one DICOM upload (stages 1 and 2 of the module docstring); whatever goes
    wrong is a `ServiceError` (`app.imaging.boundary`)."""
    with image_boundary("the upload looks like DICOM but its header could not be read"):
        ds = _read(data, policy)
    with image_boundary("the DICOM header is malformed"):  # a value of the wrong type or VR
        modality = _gate_intended_use(ds, policy.intended_use)
        _gate_pixels(ds, max_pixels, min_side)
        population_warning = _population_warning(ds, policy)
    return OpenedDicom(ds, modality, population_warning)
