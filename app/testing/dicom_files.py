"""DICOM Part-10 files made by the tests and the benchmarks, for every transfer syntax and
rendering case the service takes (no patient image is committed). Compressed syntaxes come from
pydicom's own encoders (RLE, JPEG-LS, JPEG 2000, deflate) and from imagecodecs (JPEG baseline,
extended and lossless; a development dependency), each encapsulated as a single-frame DICOM image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
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

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
US_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

# Fixed instance UIDs, so tests can check they come back.
STUDY_UID = "1.2.826.0.1.3680043.10.1001.1"
SERIES_UID = "1.2.826.0.1.3680043.10.1001.2"
SOP_UID = "1.2.826.0.1.3680043.10.1001.3"

SYNTAXES: dict[str, UID] = {
    "implicit_le": ImplicitVRLittleEndian,
    "explicit_le": ExplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_baseline": JPEGBaseline8Bit,
    "jpeg_extended": JPEGExtended12Bit,
    "jpeg_lossless": JPEGLossless,
    "jpeg_lossless_sv1": JPEGLosslessSV1,
    "jpeg_ls": JPEGLSLossless,
    "jpeg_ls_near": JPEGLSNearLossless,
    "j2k_lossless": JPEG2000Lossless,
    "j2k": JPEG2000,
}
LOSSY = frozenset({"jpeg_baseline", "jpeg_extended", "jpeg_ls_near", "j2k"})


def _imagecodecs_frame(stored: np.ndarray, syntax: str, bits_stored: int) -> bytes:
    import imagecodecs

    if syntax == "jpeg_baseline":
        return bytes(imagecodecs.jpeg8_encode(stored.astype(np.uint8), level=95))
    if syntax == "jpeg_extended":
        return bytes(imagecodecs.jpeg8_encode(stored, bitspersample=12, level=95))
    predictor = 1 if syntax == "jpeg_lossless_sv1" else 6
    return bytes(
        imagecodecs.jpeg8_encode(
            stored, lossless=True, predictor=predictor, bitspersample=bits_stored
        )
    )


def make_dataset(
    stored: np.ndarray,
    *,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    modality: str | None = "DX",
    sop_class: str = DX_STORAGE,
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    rescale: tuple[float, float] | None = None,
    window: tuple[Sequence[float] | float, Sequence[float] | float] | None = None,
    voi_function: str | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    modality_lut: tuple[int, int, Sequence[int]] | None = None,
    padding: tuple[int, int | None] | None = None,
    presentation_inverse: bool = False,
    patient_age: str | None = "003Y",
    extra: dict[str, Any] | None = None,
) -> Dataset:
    """A single-frame radiograph data set (uncompressed) around `stored` pixel values."""
    if stored.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"stored pixels must be uint8, uint16 or int16, not {stored.dtype}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(SOP_UID)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-0001"
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    if patient_age is not None:
        ds.PatientAge = patient_age
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        ds.VOILUTSequence = [_lut_item(*voi_lut)]
    if modality_lut is not None:
        ds.ModalityLUTSequence = [_lut_item(*modality_lut)]
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    if padding is not None:
        ds.PixelPaddingValue = padding[0]
        if padding[1] is not None:
            ds.PixelPaddingRangeLimit = padding[1]
    if presentation_inverse:
        ds.PresentationLUTShape = "INVERSE"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def _lut_item(first: int, bits: int, table: Sequence[int]) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(table) % 65536, first, bits])
    # one 16-bit word per entry, as OW (little endian, like the rest of these files)
    item.add_new("LUTData", "OW", np.asarray(table, dtype="<u2").tobytes())
    return item


def encode_dataset(ds: Dataset, syntax: str = "explicit_le") -> bytes:
    """Part-10 bytes of `ds` (built by `make_dataset`) in the named transfer syntax."""
    uid = SYNTAXES[syntax]
    little_endian, implicit_vr = True, syntax == "implicit_le"
    if syntax not in ("implicit_le", "explicit_le", "deflated"):
        stored = np.frombuffer(
            ds.PixelData, dtype=f"<{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}"
        ).reshape(ds.Rows, ds.Columns)
    if syntax == "explicit_be":
        little_endian = False
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    elif syntax in ("rle", "jpeg_ls", "jpeg_ls_near", "j2k_lossless", "j2k"):
        kwargs: dict[str, Any] = {}
        if syntax == "jpeg_ls_near":
            kwargs["jls_error"] = 2
        if syntax == "j2k":
            kwargs["j2k_cr"] = [10]
        ds.compress(uid, stored, generate_instance_uid=False, **kwargs)
    elif syntax.startswith("jpeg"):
        frame = _imagecodecs_frame(stored, syntax, int(ds.BitsStored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        if syntax in LOSSY:
            ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = uid
    buffer = io.BytesIO()
    pydicom.dcmwrite(
        buffer,
        ds,
        enforce_file_format=True,
        little_endian=little_endian,
        implicit_vr=implicit_vr,
    )
    return buffer.getvalue()


def make_dicom(stored: np.ndarray, syntax: str = "explicit_le", **options: Any) -> bytes:
    """`make_dataset` then `encode_dataset`: a Part-10 file in one call."""
    return encode_dataset(make_dataset(stored, **options), syntax)


def ramp(rows: int = 96, columns: int = 80, high: int = 4095, dtype: Any = np.uint16) -> np.ndarray:
    """Stored values rising left to right and top to bottom, spanning [0, high]."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    values = (xx / (columns - 1) * 0.7 + yy / (rows - 1) * 0.3) * high
    ramped: np.ndarray = np.rint(values).astype(dtype)
    return ramped
