"""Reading a DICOM Part-10 upload: the policy the decoder follows, the transfer syntaxes it
reads, and the parser (a deflated data set inflated under a ceiling). pydicom is silenced here:
it would quote invalid header values, a patient's name among them, in warnings and logs."""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
import pydicom.config
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import (
    JPEG2000,
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
from app.errors import ImageTooManyPixels, InvalidImage

# pydicom reports invalid header values through `warnings` and its logger, quoting the value: that
# would put a patient's name into the service's stderr. Validation is ours, so silence both.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").propagate = False
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_DATA = 0x7FE00010

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
        stop_when=(lambda tag, vr, length: tag == PIXEL_DATA) if stop_before_pixels else None,
    )
    return FileDataset(
        "", body, preamble=preamble, file_meta=file_meta, is_implicit_VR=False,
        is_little_endian=True,
    )  # fmt: skip
