"""Stage 3 and the decoder the formats registry calls: `open_dicom` parses and gates an upload
(`read`, `gate`); `OpenedDicom.render` decodes its pixels (pydicom with the pylibjpeg plugins; a
large JPEG 2000 frame at the contract's reduced level, `codestream`; a lossless frame with
imagecodecs, `app.imaging.lossless`) and renders them (`display`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from app.errors import InvalidImage
from app.imaging.boundary import guarded, image_boundary
from app.imaging.dicom.codestream import decode_j2k_at_level, j2k_main_header, single_frame
from app.imaging.dicom.display import render_dicom
from app.imaging.dicom.gate import age_warning, gate_intended_use, gate_pixels
from app.imaging.dicom.read import DicomPolicy, read_part10
from app.imaging.dicom.values import SAFE_CODE, is_signed, uid
from app.imaging.lossless import SYNTAXES as LOSSLESS_SYNTAXES
from app.imaging.lossless import decode_lossless
from app.imaging.preprocessing import WaveletApproximation
from app.imaging.types import DicomFindings

# Faster decoders where pydicom's default is slow (lossless both ways: identical pixels): on a
# 2500x2048 12-bit frame, pylibjpeg-rle against pydicom's own Python RLE, and CharLS (pyjpegls)
# against libjpeg for JPEG-LS, about 4x faster each (measured 2026-11, docs/PERFORMANCE.md).
PREFERRED_PLUGINS: dict[UID, str] = {
    RLELossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}


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
            plugin = PREFERRED_PLUGINS.get(syntax)
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
            study_instance_uid=uid(ds, "StudyInstanceUID"),
            series_instance_uid=uid(ds, "SeriesInstanceUID"),
            sop_instance_uid=uid(ds, "SOPInstanceUID"),
            modality=self._modality,
            view_position=view if view and SAFE_CODE.match(view) else None,
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
        if syntax not in LOSSLESS_SYNTAXES or is_signed(ds):
            return None
        with image_boundary("the DICOM encapsulated pixel data has no readable frame"):
            frame = single_frame(ds.PixelData)
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
            frame = single_frame(ds.PixelData)
        header = j2k_main_header(frame)
        if (
            header is None
            or header.components != 1
            or header.offset != (0, 0)
            or header.precision != int(ds.BitsStored)
            or header.signed != is_signed(ds)
        ):
            return None
        level = policy.j2k_level(
            int(ds.Columns), int(ds.Rows), header.decomposition_levels, header.wavelet
        )
        if level <= 0:
            return None
        with image_boundary(f"the DICOM pixel data ({syntax.name}) could not be decoded"):
            values = decode_j2k_at_level(frame, header, level)
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
        ds = read_part10(data, policy.max_inflated_bytes)
    with image_boundary("the DICOM header is malformed"):  # a value of the wrong type or VR
        modality = gate_intended_use(ds, policy.intended_use)
        gate_pixels(ds, max_pixels, min_side)
        population_warning = age_warning(ds, policy)
    return OpenedDicom(ds, modality, population_warning)
