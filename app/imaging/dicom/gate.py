"""Gating on the header alone, before any pixel is decoded: the model's intended use (modality,
SOP class, body part, view position), one frame of one grey sample, integer pixels within the
size limits, a compressed frame that agrees with Rows/Columns, and the patient's age against the
training population."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileDataset

from app.contract import IntendedUse
from app.errors import InvalidImage, NotIntendedUse, OutsideTrainingPopulation
from app.imaging.dicom.codestream import check_codestream_size
from app.imaging.dicom.read import MEDIA_STORAGE_DIRECTORY, DicomPolicy
from app.imaging.dicom.values import code, patient_age_years
from app.imaging.types import DecodeLimits, check_dimensions

GREY = ("MONOCHROME1", "MONOCHROME2")


def gate_intended_use(ds: FileDataset, rules: IntendedUse) -> str:
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
            f"Modality {code(modality)} is not a projection radiograph; this model accepts "
            f"{', '.join(rules.modalities)} chest X-rays only"
        )
    if sop_class not in rules.sop_class_uids:
        accepted = ", ".join(rules.sop_class_uids.values())
        raise NotIntendedUse(
            f"SOP Class UID {code(sop_class)} is not one this model accepts ({accepted})"
        )
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part not in rules.body_parts:
        raise NotIntendedUse(
            f"Body Part Examined is {code(body_part)}, not a chest ({', '.join(rules.body_parts)})"
        )
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view in rules.refused_view_positions:
        raise NotIntendedUse(
            f"View Position {code(view)} is a lateral view; this model reads frontal (PA/AP) "
            "chest X-rays only"
        )
    return modality


def intended_use_refusal(ds: Dataset, rules: IntendedUse) -> str | None:
    """None when a header describes an image the model was made for (modality, SOP class, body
    part, view), else the reason, fit to show (coded values only). For the DICOM intakes, which
    gate on the header before they queue an instance; the pixels are checked when it is read."""
    try:
        gate_intended_use(ds, rules)  # type: ignore[arg-type]
    except NotIntendedUse as exc:
        return exc.message
    return None


def gate_pixels(ds: FileDataset, limits_max_pixels: int, min_side: int) -> None:
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
    if samples != 1 or photometric not in GREY:
        raise NotIntendedUse(
            f"the DICOM image is colour ({code(photometric)}, {code(samples)} samples per "
            "pixel); only greyscale MONOCHROME1/MONOCHROME2 radiographs are accepted"
        )
    rows, columns = ds.get("Rows"), ds.get("Columns")
    bits_allocated, bits_stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if not all(isinstance(v, int) for v in (rows, columns, bits_allocated, bits_stored)):
        raise InvalidImage("the DICOM header lacks Rows, Columns, Bits Allocated or Bits Stored")
    assert isinstance(rows, int) and isinstance(columns, int)
    check_dimensions(columns, rows, DecodeLimits(limits_max_pixels, min_side))
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise InvalidImage(
            f"unsupported DICOM pixel depth: Bits Allocated {code(bits_allocated)}, "
            f"Bits Stored {code(bits_stored)} (8- or 16-bit integer pixels are accepted)"
        )
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        check_codestream_size(ds.PixelData, rows, columns)
    else:
        expected = rows * columns * (bits_allocated // 8)
        if len(ds.PixelData) < expected:
            raise InvalidImage(
                f"DICOM pixel data is truncated: {len(ds.PixelData)} bytes for a {columns}x{rows} "
                f"image of {bits_allocated}-bit pixels ({expected} expected)"
            )


def age_warning(ds: Dataset, policy: DicomPolicy) -> str | None:
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
