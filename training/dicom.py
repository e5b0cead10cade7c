"""DICOM reading for training (the RSNA Pneumonia Detection data, or any CR/DX chest file).

This is the training half of the contract's DICOM rule (`app.contract.DicomRendering`): stored
values -> modality LUT -> VOI (window, VOI LUT Sequence or full range) -> MONOCHROME1 / INVERSE
polarity -> 8-bit grey. The service renders with its own code (`app.imaging.dicom`, a lookup table
over every possible stored value); this one computes pixel by pixel, written separately on purpose,
and `tests/contract/test_train_serve_parity.py` proves the two give the same 8-bit image on every
case. A large JPEG 2000 frame is decoded at the contract's reduced resolution level
(`app.contract.Jpeg2000Reduction`), also by this module's own reading of the codestream header.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.contract import DicomRendering, Preprocessing

# The key of a reduced JPEG 2000 frame's level, wavelet and stored size in its image's `info`
# (set by `read_dicom_as_image`, read by `training.preprocessing.image_to_array`, which resizes
# the frame onto the full-size grid).
J2K_APPROXIMATION = "cxr_j2k_approximation"

_JPEG_2000_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def _lut(item: Any, pixel_representation: int) -> tuple[np.ndarray, int, int]:
    """A LUT Sequence item as (table, first input value mapped, output bits)."""
    n_entries, first_mapped, n_bits = (int(v) for v in item.LUTDescriptor)
    if n_entries == 0:
        n_entries = 1 << 16
    if pixel_representation == 1 and first_mapped > 32767:
        first_mapped -= 1 << 16
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        width = 1 if (n_bits <= 8 and len(data) == n_entries) else 2
        table = np.frombuffer(bytes(data), dtype=np.uint8 if width == 1 else "<u2")
    else:
        table = np.array(data if isinstance(data, list | tuple) else [data])
    return table[:n_entries].astype(np.float64), first_mapped, n_bits


def _window_or_none(values: np.ndarray, dataset: Any, rule: DicomRendering) -> np.ndarray | None:
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None

    def nth(value: Any) -> float | None:
        items = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else [value]
        try:
            number = float(items[rule.window_index])
        except (IndexError, TypeError, ValueError):
            return None
        return number if np.isfinite(number) else None

    center, width = nth(dataset.WindowCenter), nth(dataset.WindowWidth)
    if center is None or width is None:
        return None
    function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function == "LINEAR" and width >= 1:
        return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    return None


def dicom_to_uint8(stored: np.ndarray, dataset: Any, rule: DicomRendering) -> np.ndarray:
    """One frame of stored pixel values -> 8-bit grey pixels, by the contract's DICOM rule."""
    stored_f = stored.astype(np.float64)
    pixel_representation = int(dataset.get("PixelRepresentation", 0) or 0)

    # Pixel Padding Value (and Range Limit): in stored values, before the modality LUT.
    padding = np.zeros(stored.shape, dtype=bool)
    if dataset.get("PixelPaddingValue") is not None:
        first = int(dataset.PixelPaddingValue)
        last = dataset.get("PixelPaddingRangeLimit")
        last = first if last is None else int(last)
        padding = (stored_f >= min(first, last)) & (stored_f <= max(first, last))

    # Modality LUT
    if len(dataset.get("ModalityLUTSequence") or []):
        table, first_mapped, _ = _lut(dataset.ModalityLUTSequence[0], pixel_representation)
        values = table[np.clip(stored_f - first_mapped, 0, len(table) - 1).astype(np.intp)]
    else:
        slope = float(dataset.get("RescaleSlope") or 1.0)
        intercept = float(dataset.get("RescaleIntercept") or 0.0)
        values = stored_f * slope + intercept

    # VOI: the first source in the contract's order that the file offers
    shown: np.ndarray | None = None
    for source in rule.voi_order:
        if source == "window":
            shown = _window_or_none(values, dataset, rule)
        elif source == "voi_lut_sequence" and len(dataset.get("VOILUTSequence") or []):
            table, first_mapped, n_bits = _lut(dataset.VOILUTSequence[0], pixel_representation)
            index = np.clip(np.floor(values) - first_mapped, 0, len(table) - 1).astype(np.intp)
            shown = np.minimum(table[index] / float(2**n_bits - 1), 1.0)
        elif source == "full_range":
            counted = values[~padding] if rule.full_range_excludes_padding else values
            lo = float(counted.min()) if counted.size else 0.0
            hi = float(counted.max()) if counted.size else 0.0
            shown = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        if shown is not None:
            break
    assert shown is not None  # the contract guarantees voi_order ends with full_range

    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    presentation = str(dataset.get("PresentationLUTShape") or "").strip().upper()
    if photometric == "MONOCHROME1" or presentation == "INVERSE":
        shown = 1.0 - shown
    grey = np.rint(shown * 255.0).astype(np.uint8)
    grey[padding] = rule.padding_value
    return grey


def _codestream_facts(frame: bytes) -> dict[str, Any] | None:
    """SIZ and COD/COC facts of a JPEG 2000 main header (first component), or None."""
    import struct

    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ
    if start < 0 or len(frame) < start + 45:
        return None
    siz = start + 2
    _, _, xsiz, ysiz, xosiz, yosiz, _, _, _, _, csiz = struct.unpack_from(
        ">HHIIIIIIIIH", frame, siz + 2
    )
    facts = {
        "width": xsiz - xosiz,
        "height": ysiz - yosiz,
        "origin": xosiz | yosiz,
        "components": csiz,
        "precision": (frame[siz + 40] & 0x7F) + 1,
        "signed": frame[siz + 40] >> 7,
    }
    cod = coc = None
    at = siz
    for _ in range(256):
        if at + 4 > len(frame) or frame[at] != 0xFF or frame[at + 1] == 0x90:  # 0x90: SOT
            break
        (size,) = struct.unpack_from(">H", frame, at + 2)
        if size < 2:
            return None
        if frame[at + 1] == 0x52:  # COD: Lcod, Scod, progression, layers (2), MCT, levels,
            # code-block width, height, style, transformation (1: the 5/3 wavelet, 0: the 9/7)
            cod = (frame[at + 9], frame[at + 13]) if at + 14 <= len(frame) else None
        if frame[at + 1] == 0x53:  # COC for component 0 overrides COD
            wide = csiz >= 257
            component = int.from_bytes(frame[at + 4 : at + 6 if wide else at + 5], "big")
            level_at = at + (7 if wide else 6)
            if component == 0 and level_at + 5 <= len(frame):
                coc = (frame[level_at], frame[level_at + 4])
        at += 2 + size
    if cod is None:
        return None
    facts["levels"], transformation = cod if coc is None else coc
    if transformation not in (0, 1):
        return None
    facts["wavelet"] = "5/3" if transformation == 1 else "9/7"
    return facts


def contract_j2k_level(
    width: int, height: int, levels: int, wavelet: str, spec: Preprocessing
) -> int:
    """The contract's resolution level for a JPEG 2000 frame (0: full resolution) coded with
    `wavelet` ("5/3" or "9/7", from its COD/COC transformation)."""
    rule = spec.dicom_j2k_reduction
    if rule is None or wavelet not in rule.wavelets:
        return 0
    fits = min(width, height) // (rule.min_ratio * max(spec.height, spec.width))
    for level in (3, 2, 1):
        if level <= rule.max_level and level <= levels and fits >= 2**level:
            return level
    return 0


def _reduced_j2k_pixels(
    dataset: Any, spec: Preprocessing | None
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Stored values of a JPEG 2000 frame at the contract's level, with what the resize needs to
    know of them (`image_to_array`), or None (decode in full)."""
    from PIL import ImageFile
    from pydicom.encaps import generate_frames

    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if spec is None or str(syntax) not in _JPEG_2000_SYNTAXES:
        return None
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    facts = _codestream_facts(frame)
    signed = int(dataset.get("PixelRepresentation", 0) or 0)
    if (
        facts is None
        or facts["components"] != 1
        or facts["origin"] != 0
        or facts["precision"] != int(dataset.BitsStored)
        or facts["signed"] != signed
    ):
        return None
    level = contract_j2k_level(
        int(dataset.Columns), int(dataset.Rows), facts["levels"], facts["wavelet"], spec
    )
    if level == 0:
        return None
    width = math.ceil(int(dataset.Columns) / 2**level)
    height = math.ceil(int(dataset.Rows) / 2**level)
    image = Image.open(io.BytesIO(frame), formats=["JPEG2000"])
    # Pillow's `reduce` would round the reduced size half up; OpenJPEG's is the ceiling.
    codec, _, layers, fd, length = image.tile[0].args  # type: ignore[misc, str-unpack]
    image._size = (width, height)
    image.tile = [
        ImageFile._Tile("jpeg2k", (0, 0, width, height), 0, (codec, level, layers, fd, length))
    ]
    image.load()
    raw = np.array(image, dtype=np.int64)
    if raw.shape != (height, width):
        raise ValueError(f"JPEG 2000 frame decoded to {raw.shape}, not {height}x{width}")
    # Pillow scales samples up to fill 8 or 16 bits and offsets signed ones to unsigned.
    container = 16 if image.mode == "I;16" else 8
    values = raw // 2 ** (container - facts["precision"])
    if signed:
        values = values - 2 ** (facts["precision"] - 1)
    kind = "int" if signed else "uint"
    approximation = {
        "level": level,
        "wavelet": facts["wavelet"],
        "stored_size": (int(dataset.Columns), int(dataset.Rows)),
    }
    return values.astype(f"{kind}{int(dataset.BitsAllocated)}"), approximation


def read_dicom_as_image(
    path: Path, rule: DicomRendering, spec: Preprocessing | None = None
) -> Image.Image:
    """Read a single-frame greyscale DICOM file into an 8-bit Pillow `L` image. With `spec`, a
    large JPEG 2000 frame is decoded at the contract's reduced level (`dicom_j2k_reduction`)."""
    import pydicom

    dataset = pydicom.dcmread(str(path))
    if str(dataset.get("PhotometricInterpretation", "")).upper() not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        raise ValueError(f"{Path(path).name}: not a greyscale (MONOCHROME1/2) image")
    reduced = _reduced_j2k_pixels(dataset, spec)
    pixels = dataset.pixel_array if reduced is None else reduced[0]
    if pixels.ndim != 2:
        raise ValueError(f"{Path(path).name}: expected one frame, got shape {pixels.shape}")
    image = Image.fromarray(dicom_to_uint8(pixels, dataset, rule), mode="L")
    if reduced is not None:  # `training.preprocessing.image_to_array` resizes it by the rule
        image.info[J2K_APPROXIMATION] = reduced[1]
    return image
