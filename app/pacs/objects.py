"""DICOM renderings of one prediction: a TID 1500 Structured Report and a heat-map SC image.

The JSON answer is the source of truth; each object here renders the same facts (`ResultFacts`):
the same calibrated probability, operating threshold, model identity and research-use disclaimer.
Both objects join the source image's study (its patient and study modules are copied from it) in
series of their own, with UIDs from `app.pacs.uids` so that the same image read by the same model
always gives the same instances.

An object is a function of the source image and the reading, never of the clock: every date and
time it carries is the source's own (`ObjectTime`), so the same image, model and site profile
render byte for byte the same objects on any pod at any time. An archive that already holds an
instance then holds exactly what a re-send carries, whether it keeps the first copy (Orthanc's
default) or refuses the second (409, 0x0111).
"""

from __future__ import annotations

import datetime
import functools
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from app.model.explain import blend, colour, upsample
from app.pacs.outbox import ResultObject
from app.pacs.uids import (
    ObjectKind,
    device_uid,
    result_instance_uid,
    result_series_uid,
    study_result_instance_uid,
    study_result_series_uid,
)

# highdicom logs the UIDs of the data sets it copies from at INFO; those are study header values.
logging.getLogger("highdicom").setLevel(logging.WARNING)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SrClass = Literal["comprehensive-3d", "enhanced"]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# SNOMED CT 233604007 "Pneumonia (disorder)"; not in pydicom's code dictionary.
PNEUMONIA = hd.sr.CodedConcept(value="233604007", scheme_designator="SCT", meaning="Pneumonia")
# SNOMED CT 399208008 "Plain chest X-ray": the Procedure Reported (TID 1500 row 4, CID 100 is
# extensible), more specific than CID 100's generic "Imaging procedure".
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(
    value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray"
)
# UMLS C0034375 "Qualitative Evaluations": TID 1500 row 12, the report-level container of coded
# and free-text conclusions (rows 13 and 14), where the verdict and the text for readers go.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)
# DCM 121106 "Comment": free text in the report, and the one TEXT item OHIF's SR loader shows
# beside a measurement group's numbers.
COMMENT = hd.sr.CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")
# SCT 42798000 "Area", of the attention region as a share of the image (UCUM "%").
AREA = hd.sr.CodedConcept(value="42798000", scheme_designator="SCT", meaning="Area")
PERCENT = hd.sr.CodedConcept(value="%", scheme_designator="UCUM", meaning="Percent")
# IHE AIR's Purpose of Reference for the algorithm in Contributing Equipment (a placeholder code
# the profile defines until a standard one exists).
PROCESSING_ALGORITHM = hd.sr.CodedConcept(
    value="Newcode1", scheme_designator="99IHE", meaning="Processing Algorithm"
)
# DCM 109101 "Acquisition Equipment": the item highdicom adds for a source naming its manufacturer
ACQUISITION_EQUIPMENT = str(codes.DCM.AcquisitionEquipment.value)
SR_SERIES_DESCRIPTION = "AI RESULT - RESEARCH USE ONLY"
SC_SERIES_DESCRIPTION = "AI HEAT MAP - RESEARCH USE ONLY"
STUDY_SR_SERIES_DESCRIPTION = "AI STUDY RESULT - RESEARCH USE ONLY"
SR_SERIES_NUMBER = 901
SC_SERIES_NUMBER = 902
MANUFACTURER = "pneumonia-screening"
# The date and time of an object whose source carries none (no content, acquisition or study date).
NO_SOURCE_DATE = "19700101"
NO_SOURCE_TIME = "000000"


@dataclass(frozen=True)
class ResultFacts:
    """What the JSON answer says, in the terms the DICOM objects need."""

    label: str
    probabilities: dict[str, float]
    positive_class: str
    threshold: float
    model_name: str
    model_version: str
    model_sha256: str
    disclaimer: str
    cam_grid: Sequence[Sequence[float]] | None = field(default=None)
    # The site profile that recalibrated the probability and set the threshold, when one was
    # loaded (the answer's `calibration.sha256`): part of the result objects' UIDs.
    site_profile_sha256: str | None = None
    # The answer's caveats (`warnings`), e.g. a patient outside the training population: the SR
    # states each one to its reader.
    warnings: tuple[str, ...] = ()
    # The sha256 of the source's pixel data (`app.pacs.uids.pixel_data_digest`), set by the
    # pipeline: part of the UIDs, so that another image under the same SOP Instance UID is
    # another result. None: the UIDs of one source UID and reading, as before content joined them.
    pixel_digest: str | None = None

    @property
    def positive_probability(self) -> float:
        return self.probabilities[self.positive_class]

    @property
    def positive(self) -> bool:
        """The finding at the operating point, from the answer's label (not re-derived)."""
        return self.label == self.positive_class

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any], positive_class: str) -> ResultFacts:
        """The facts of a `/predict` JSON answer (`PredictionResponse.model_dump()`).

        `positive_class` is the model contract's `decision.positive_class`. The CAM grid is taken
        when the answer carries an explanation of that class.
        """
        model = answer["model"]
        explanation = answer.get("explanation") or {}
        grid = (
            explanation.get("grid") if explanation.get("target_class") == positive_class else None
        )
        site = answer.get("calibration") or {}
        return cls(
            label=str(answer["label"]),
            probabilities={str(k): float(v) for k, v in answer["probabilities"].items()},
            positive_class=positive_class,
            threshold=float(answer["threshold"]),
            model_name=str(model["name"]),
            model_version=str(model["version"]),
            model_sha256=str(model["sha256"]),
            disclaimer=str(answer["disclaimer"]),
            cam_grid=grid,
            site_profile_sha256=str(site["sha256"]) if site.get("sha256") else None,
            warnings=tuple(str(w) for w in answer.get("warnings") or ()),
        )

    def __post_init__(self) -> None:
        if self.positive_class not in self.probabilities:
            raise ValueError("positive_class is not one of the probabilities' classes")
        if self.label not in self.probabilities:
            raise ValueError("label is not one of the probabilities' classes")
        if self.cam_grid is not None:
            grid = np.asarray(self.cam_grid, dtype=np.float64)
            if grid.ndim != 2 or grid.size == 0 or not np.all(np.isfinite(grid)):
                raise ValueError("cam_grid must be a non-empty 2-D grid of finite numbers")


def _algorithm(facts: ResultFacts) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=facts.model_name,
        version=facts.model_version,
        parameters=[
            f"onnx sha256={facts.model_sha256}",
            *(
                [f"site profile sha256={facts.site_profile_sha256}"]
                if facts.site_profile_sha256
                else []
            ),
        ],
        family=codes.cid7162.ArtificialIntelligence,
    )


def _contributing_equipment(facts: ResultFacts) -> hd.ContributingEquipment:
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=facts.model_name[:64],
        software_versions=facts.model_version[:64],
        contribution_description=facts.disclaimer[:1024],
    )
    # highdicom accepts only CID 7005 purposes; IHE AIR names its own code for an algorithm.
    equipment.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    # highdicom has no argument for it; IHE AIR asks for a Device UID that changes with the model.
    equipment.DeviceUID = device_uid(facts.model_sha256)
    return equipment


def _library_view(source: Dataset) -> Dataset:
    """The header fields the SR's Image Library describes, without pixels.

    The projection-radiography descriptors (TID 1603) need Patient Orientation and Imager Pixel
    Spacing, both Type 3 in CR and often missing (the pydicom-data CR has neither). Without them the
    library entry keeps only the TID 1602 items (modality from the SOP class, rows, columns):
    nothing is invented. highdicom picks the projection descriptors by the Modality attribute, so
    the view then carries "OT" there while the coded modality still comes from the SOP class.
    """
    view = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
        "PatientOrientation",
        "ImagerPixelSpacing",
        "FrameOfReferenceUID",
    ):
        if keyword in source:
            setattr(view, keyword, source[keyword].value)
    spacing = view.get("ImagerPixelSpacing")
    has_projection = (
        "PatientOrientation" in view
        and len(view.PatientOrientation) == 2
        and spacing is not None
        and len(spacing) == 2
    )
    if not has_projection:
        view.Modality = "OT"
    return view


# Type 2 attributes of the Patient and General Study modules: highdicom reads them all from the
# evidence; an absent one becomes present and empty, which is what Type 2 means.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


# What filing a result into the source's patient and study needs, and what the readers of this
# service's tests and viewers show: identifiers, the Type 2 attributes and the study's
# description. Every other attribute of the Patient and Study information entities (Type 3 free
# text such as Patient Comments, Medical Alerts, Additional Patient History, allergies, weight,
# occupation) stays in the image: the result does not need it and must not spread it.
_FILING_ATTRIBUTES = frozenset(
    (
        *_TYPE2_PATIENT_STUDY,
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID",
        "StudyInstanceUID",
        "IssuerOfAccessionNumberSequence",
        "StudyDescription",
    )
)


@functools.cache
def _patient_and_study_keywords(sop_class_uid: str) -> frozenset[str]:
    """The root attributes of the Patient and Study information entities of an IOD (those that
    highdicom's `copy_patient_and_study_information` copies)."""
    # highdicom's own tables of the standard, the ones its copy uses
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    attributes = get_module_attribute_map()
    keywords: set[str] = set()
    for module in get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]:
        if module["ie"] in ("Patient", "Study"):
            keywords |= {str(a["keyword"]) for a in attributes[module["key"]] if not a["path"]}
    return frozenset(keywords)


def _keep_filing_only(ds: Dataset) -> None:
    """Drop every Patient and Study attribute but those filing needs (`_FILING_ATTRIBUTES`)."""
    for keyword in _patient_and_study_keywords(str(ds.SOPClassUID)) - _FILING_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)


def _evidence_view(source: Dataset) -> Dataset:
    """The source's header without its pixels, Type 2 patient/study attributes present."""
    view = Dataset()
    for element in source:
        if element.tag.group < 0x7FE0:
            view.add(element)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in view:
            setattr(view, keyword, "")
    return view


def _builder_view(evidence: Dataset) -> Dataset:
    """`evidence` with its person names emptied, for highdicom's constructors.

    highdicom warns about unusual person names and quotes them in the warning, which would put a
    patient's or physician's name into the logs. The constructors get empty names; the real
    modules are copied onto the finished object afterwards.
    """
    view = Dataset()
    for element in evidence:
        if element.VR == "PN":
            view.add_new(element.tag, "PN", "")
        else:
            view.add(element)
    return view


def _hottest_cell_polygon(grid: Sequence[Sequence[float]], rows: int, columns: int) -> np.ndarray:
    """Closed polyline (column, row pixel coordinates) around the CAM grid's hottest cell.

    The model input is the whole image resized without keeping the aspect ratio, so a grid cell
    maps onto the image by plain scaling.
    """
    cam = np.asarray(grid, dtype=np.float64)
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    cell_h, cell_w = rows / cam.shape[0], columns / cam.shape[1]
    top, left = r * cell_h, c * cell_w
    bottom, right = min(top + cell_h, rows - 1.0), min(left + cell_w, columns - 1.0)
    return np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        dtype=np.float32,
    )


_DATE = re.compile(r"[0-9]{8}")
# HH, HHMM, HHMMSS or HHMMSS.F to .FFFFFF (PS3.5 TM, without the ACR-NEMA colons)
_TIME = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.[0-9]{1,6})?)?)?")
# the parts of a DT before its UTC offset
_DATETIME = re.compile(r"([0-9]{8})([0-9.]*)(?:[+-][0-9]{4})?")


def _valid_date(value: object) -> str | None:
    text = str(value or "").strip()
    if not _DATE.fullmatch(text):
        return None
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return text


def _valid_time(value: object) -> str | None:
    text = str(value or "").strip()
    match = _TIME.fullmatch(text)
    if match is None:
        return None
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    # 60: a leap second, which TM allows
    return text if hours < 24 and minutes < 60 and seconds <= 60 else None


@dataclass(frozen=True)
class ObjectTime:
    """The one date and time a result object carries wherever DICOM asks for one: Instance
    Creation, Content, Date/Time of Secondary Capture, and the Contribution DateTime of the
    algorithm and of highdicom in Contributing Equipment (the source's acquisition equipment,
    when highdicom lists it, keeps the source's acquisition date/time or none).

    Taken from the source image, never the clock: its Content Date/Time, else its Acquisition
    DateTime or Date/Time, else its Study Date/Time, else `NO_SOURCE_DATE` `NO_SOURCE_TIME`
    (1970-01-01 00:00:00). A date without a usable time gets 000000; an invalid date is passed
    over. The values are the source's own strings, at its precision and in its local time (any
    UTC offset of a DT is dropped, as the other times carry none). When the service rendered an
    object is in the outbox and the logs, not in the object.
    """

    date: str
    time: str

    @property
    def date_time(self) -> str:
        """The DT form (YYYYMMDDHHMMSS.FFFFFF, as precise as the time)."""
        return self.date + self.time

    @classmethod
    def of_source(cls, source: Dataset) -> ObjectTime:
        candidates: list[tuple[object, object]] = [
            (source.get("ContentDate"), source.get("ContentTime"))
        ]
        combined = _DATETIME.fullmatch(str(source.get("AcquisitionDateTime") or "").strip())
        if combined is not None:
            candidates.append((combined.group(1), combined.group(2)))
        candidates += [
            (source.get("AcquisitionDate"), source.get("AcquisitionTime")),
            (source.get("StudyDate"), source.get("StudyTime")),
        ]
        for date, time in candidates:
            valid = _valid_date(date)
            if valid is not None:
                return cls(valid, _valid_time(time) or NO_SOURCE_TIME)
        return cls(NO_SOURCE_DATE, NO_SOURCE_TIME)


def _stamp(ds: Dataset, when: ObjectTime) -> None:
    """Put `when` wherever highdicom put the clock (its constructors read `datetime.now()`)."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = when.date, when.time
    ds.ContentDate, ds.ContentTime = when.date, when.time
    if "DateOfSecondaryCapture" in ds or "TimeOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = when.date, when.time
    for item in ds.get("ContributingEquipmentSequence", []):
        purposes = item.get("PurposeOfReferenceCodeSequence") or [Dataset()]
        # the source's acquisition equipment keeps what highdicom read from the source, if any
        if purposes[0].get("CodeValue") != ACQUISITION_EQUIPMENT:
            item.ContributionDateTime = when.date_time


def summary_text(facts: ResultFacts) -> str:
    """The result in words, as the report's first line and OHIF's label: the verdict at the
    operating point (the site profile's when one set it, else the model's) and its figures."""
    verdict = "likely" if facts.positive else "unlikely"
    point = "site's" if facts.site_profile_sha256 else "model's"
    return (
        f"Pneumonia: {verdict} at the {point} operating point "
        f"(probability {facts.positive_probability:.3f}, threshold {facts.threshold:.3f})"
    )


def report_texts(facts: ResultFacts) -> list[str]:
    """The free text of the report, in reading order: the result in words, what the outlined
    region is (when there is one), the disclaimer, then every warning of the answer."""
    texts = [summary_text(facts)]
    if _shows_region(facts):
        texts.append(f"Outlined region: {REGION_MEANING}")
    texts.append(facts.disclaimer)
    texts += [f"Warning: {warning}" for warning in facts.warnings]
    return texts


# What the outlined region of a positive answer is, in the report and beside the outline.
ATTENTION_IDENTIFIER = "class activation map peak (attention, not a detection)"
REGION_MEANING = (
    "the peak of the model's class activation map (where the model's attention was highest), "
    "not a detected lesion"
)


def _shows_region(facts: ResultFacts) -> bool:
    """A region is drawn only beside a Present finding: beside Absent, a viewer's box would read
    as a detection of what the report says is not there."""
    return facts.positive and facts.cam_grid is not None


def _whole_image_outline(rows: int, columns: int) -> np.ndarray:
    """Closed polyline around the whole image (column, row pixel coordinates): what a
    whole-image classification was inferred from."""
    right, bottom = float(columns - 1), float(rows - 1)
    return np.array(
        [[0.0, 0.0], [right, 0.0], [right, bottom], [0.0, bottom], [0.0, 0.0]],
        dtype=np.float32,
    )


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value[:10240], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _referenced_requests(source: Dataset) -> list[Dataset] | None:
    """The SR's Referenced Request Sequence: the source's request (Request Attributes Sequence
    items, else its own header) with its accession number; none when the source names no
    accession number and no requested procedure."""
    requests = list(source.get("RequestAttributesSequence") or []) or [Dataset()]
    items: list[Dataset] = []
    for request in requests:
        accession = str(request.get("AccessionNumber") or source.get("AccessionNumber") or "")
        procedure_id = str(request.get("RequestedProcedureID") or "")
        description = str(
            request.get("RequestedProcedureDescription")
            or source.get("RequestedProcedureDescription")
            or ""
        )
        codes_ = request.get("RequestedProcedureCodeSequence") or source.get(
            "RequestedProcedureCodeSequence"
        )
        if not (accession or procedure_id or description or codes_):
            continue
        item = Dataset()
        item.StudyInstanceUID = source.StudyInstanceUID
        item.ReferencedStudySequence = []
        item.AccessionNumber = accession
        issuer = request.get("IssuerOfAccessionNumberSequence") or source.get(
            "IssuerOfAccessionNumberSequence"
        )
        if issuer:
            item.IssuerOfAccessionNumberSequence = issuer
        item.PlacerOrderNumberImagingServiceRequest = str(
            source.get("PlacerOrderNumberImagingServiceRequest") or ""
        )
        item.FillerOrderNumberImagingServiceRequest = str(
            source.get("FillerOrderNumberImagingServiceRequest") or ""
        )
        item.RequestedProcedureID = procedure_id
        item.RequestedProcedureDescription = description
        item.RequestedProcedureCodeSequence = list(codes_ or [])
        items.append(item)
    return items or None


def build_sr(
    source: Dataset,
    facts: ResultFacts,
    *,
    series_number: int = SR_SERIES_NUMBER,
    institution_name: str | None = None,
    sr_class: SrClass = "comprehensive-3d",
) -> Dataset:
    """A TID 1500 Measurement Report of the answer for `source`: Comprehensive 3D SR (what IHE AIR
    names), or Enhanced SR for a PACS that does not take 88.34 (the content has only 2-D SCOORDs,
    so it fits either).

    Procedure Reported is a plain chest X-ray; the Referenced Request Sequence carries the
    source's accession number and requested procedure. The tree:

    - Imaging Measurements, one whole-image group (TID 1501) "pneumonia classification": finding
      Pneumonia, the algorithm, the source image, the result in words (a Comment), the
      calibrated probability (DCM 122157), inferred from the whole image (an outline of it, which
      is also what OHIF needs to show the group at all: its SR loader reads the first coordinate
      of every group, OHIF/Viewers#3390), and the operating threshold (DCM 122411).
    - With a CAM grid and a Present finding only, a second TID 1501 group outlining the hottest
      cell, named for what it is: the attention map's peak, not a detection (its area, as a share
      of the image, is inferred from the outline).
    - Qualitative Evaluations (TID 1500 row 12): Pneumonia = Present/Absent at the operating
      point, then the text a reader needs (`report_texts`): the result in words, what the region
      is, the research-use disclaimer and every warning of the answer.
    """
    source_uid = str(source.SOPInstanceUID)
    kind: ObjectKind = "sr" if sr_class == "comprehensive-3d" else "sr-enhanced"
    present = codes.DCM.Present if facts.positive else codes.DCM.Absent
    group_uid = (
        result_instance_uid(
            source_uid, facts.model_sha256, kind, facts.site_profile_sha256, facts.pixel_digest
        )
        + ".1"
    )
    classification = _classification_group(
        source, facts, group_uid, f"Pneumonia {'likely' if facts.positive else 'unlikely'}"
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = [classification]
    if _shows_region(facts):
        assert facts.cam_grid is not None
        groups.append(_attention_group(source, facts, group_uid[:-1] + "2"))
    report = hd.sr.MeasurementReport(
        observation_context=_device_observation(facts),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=[_library_view(source)],
    )
    conclusions = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    conclusions.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=PNEUMONIA,
                value=present,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            *(_text(COMMENT, text) for text in report_texts(facts)),
        ]
    )
    report[0].ContentSequence.append(conclusions)
    evidence = _evidence_view(source)
    document = hd.sr.Comprehensive3DSR if sr_class == "comprehensive-3d" else hd.sr.EnhancedSR
    sr = document(
        evidence=[_builder_view(evidence)],
        content=report[0],
        series_instance_uid=result_series_uid(
            source_uid, facts.model_sha256, "sr", facts.site_profile_sha256, facts.pixel_digest
        ),
        series_number=series_number,
        sop_instance_uid=result_instance_uid(
            source_uid, facts.model_sha256, kind, facts.site_profile_sha256, facts.pixel_digest
        ),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        institution_name=institution_name,
        requested_procedures=_referenced_requests(source),
        contributing_equipment=[_contributing_equipment(facts)],
        series_description=SR_SERIES_DESCRIPTION,
    )
    # the whole Patient, General Study and Patient Study modules, not only highdicom's selection
    sr.copy_patient_and_study_information(evidence)
    _keep_filing_only(sr)
    _stamp(sr, ObjectTime.of_source(source))
    return _explicit_le(sr)


def _classification_group(
    source: Dataset,
    facts: ResultFacts,
    uid: str,
    comment: str,
    identifier: str = "pneumonia classification",
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The whole-image TID 1501 group of one image's answer: finding Pneumonia, the algorithm,
    the source image, `comment` (the result in words), the calibrated probability inferred from
    an outline of the whole image (OHIF's SR loader reads the first coordinate of every group,
    OHIF/Viewers#3390) and the operating threshold."""
    algorithm = _algorithm(facts)
    probability = round(float(facts.positive_probability), 6)
    rows, columns = int(source.Rows), int(source.Columns)
    classification = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=probability,
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
                referenced_coordinates=[
                    hd.sr.CoordinatesForMeasurement(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=_whole_image_outline(rows, columns),
                        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
                    )
                ],
            ),
            hd.sr.Measurement(
                name=codes.DCM.ThresholdValue,
                value=round(float(facts.threshold), 6),
                unit=codes.UCUM.NoUnits,
            ),
        ],
    )
    # OHIF shows a group's Comment as the first line of its label, before the numbers; kept
    # short, as its label box is not wrapped
    classification[0].ContentSequence.insert(
        _after_finding(classification[0]), _text(COMMENT, comment)
    )
    return classification


def _device_observation(facts: ResultFacts) -> hd.sr.ObservationContext:
    """The observation context of a report: the algorithm as the observing device."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(facts.model_sha256),
            name=facts.model_name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=facts.model_name[:64],
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


@dataclass(frozen=True)
class StudyImage:
    """One frontal image a study result was made from: its header (no pixels) and its answer."""

    source: Dataset
    facts: ResultFacts

    @property
    def sop_instance_uid(self) -> str:
        return str(self.source.SOPInstanceUID)


@dataclass(frozen=True)
class SetAsideImage:
    """An image of the study that was not read, and why (coded values only)."""

    sop_instance_uid: str
    reason: str


STUDY_RULE = (
    "Study rule: the most positive frontal image decides (the highest probability; the study is "
    "likely when that image is at or above the operating threshold)"
)


def deciding_image(images: Sequence[StudyImage]) -> StudyImage:
    """The image whose answer is the study's: the highest probability of the positive class,
    the lowest SOP Instance UID among equals (so the choice never depends on arrival order)."""
    if not images:
        raise ValueError("a study result needs at least one image that was read")
    return min(images, key=lambda i: (-i.facts.positive_probability, i.sop_instance_uid))


def study_texts(images: Sequence[StudyImage], set_aside: Sequence[SetAsideImage]) -> list[str]:
    """The free text of a study report, in reading order: the study's result in words, the
    rule, each image read with its own figures, each image set aside with the reason, the
    disclaimer, then every warning of the answers (once each)."""
    decider = deciding_image(images)
    facts = decider.facts
    count = f"{len(images)} frontal image{'s' if len(images) != 1 else ''}"
    texts = [f"Study: {summary_text(facts)}, from the most positive of {count}", STUDY_RULE]
    for number, image in enumerate(images, start=1):
        verdict = "likely" if image.facts.positive else "unlikely"
        texts.append(
            f"Image {number} read ({image.sop_instance_uid}): pneumonia {verdict}, probability "
            f"{image.facts.positive_probability:.3f}, threshold {image.facts.threshold:.3f}"
            + (" (decides the study)" if image is decider else "")
        )
    texts += [f"Set aside ({item.sop_instance_uid}): {item.reason}" for item in set_aside]
    texts.append(facts.disclaimer)
    warnings = dict.fromkeys(w for image in images for w in image.facts.warnings)
    texts += [f"Warning: {warning}" for warning in warnings]
    return texts


def _latest_time(sources: Sequence[Dataset]) -> ObjectTime:
    """The latest of the sources' own times (a study result cannot predate its last image)."""
    times = [ObjectTime.of_source(source) for source in sources]
    return max(times, key=lambda t: (t.date, t.time.split(".")[0].ljust(6, "0"), t.time))


def build_study_sr(
    images: Sequence[StudyImage],
    set_aside: Sequence[SetAsideImage],
    images_digest: str,
    *,
    series_number: int = SR_SERIES_NUMBER,
    sr_class: SrClass = "comprehensive-3d",
) -> Dataset:
    """One TID 1500 Measurement Report for a study: its verdict and every frontal image's own.

    - Imaging Measurements: per image read, the whole-image TID 1501 group of `build_sr`
      ("pneumonia classification, image N", its Comment "Image N: pneumonia likely/unlikely"),
      and, beside a Present answer with a CAM grid, its attention-peak group. The deciding
      image's groups come first, then the others' in SOP Instance UID order (N is always the
      image's place in that order): OHIF opens an SR at its first measurement group and shows
      one display set per CR/DX image, so the first group is the one a reader sees.
    - Image Library and the evidence: the images read; the images set aside are named in the text
      only (they were not used).
    - Qualitative Evaluations: Pneumonia = Present/Absent for the study (`deciding_image`), then
      `study_texts`.

    Patient, study and request come from the deciding image; the object's date and time are the
    latest of the images' own. UIDs from the study, the reading and `images_digest`
    (`app.pacs.uids.image_set_digest` of every image considered, read or set aside).
    """
    ordered = sorted(images, key=lambda i: i.sop_instance_uid)
    decider = deciding_image(ordered)
    facts = decider.facts
    study_uid = str(decider.source.StudyInstanceUID)
    kind: ObjectKind = "sr" if sr_class == "comprehensive-3d" else "sr-enhanced"
    instance_uid = study_result_instance_uid(
        study_uid, facts.model_sha256, kind, facts.site_profile_sha256, images_digest
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    numbered = list(enumerate(ordered, start=1))
    numbered.sort(key=lambda item: item[1] is not decider)  # stable: the decider, then UID order
    for number, image in numbered:
        verdict = "likely" if image.facts.positive else "unlikely"
        groups.append(
            _classification_group(
                image.source,
                image.facts,
                f"{instance_uid}.{2 * number - 1}",
                f"Image {number}: pneumonia {verdict}",
                identifier=f"pneumonia classification, image {number}",
            )
        )
        if _shows_region(image.facts):
            groups.append(
                _attention_group(image.source, image.facts, f"{instance_uid}.{2 * number}")
            )
    report = hd.sr.MeasurementReport(
        observation_context=_device_observation(facts),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=[_library_view(image.source) for image in ordered],
    )
    conclusions = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    conclusions.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=PNEUMONIA,
                value=codes.DCM.Present if facts.positive else codes.DCM.Absent,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            *(_text(COMMENT, text) for text in study_texts(ordered, set_aside)),
        ]
    )
    report[0].ContentSequence.append(conclusions)
    evidence = [_evidence_view(image.source) for image in ordered]
    first = evidence[ordered.index(decider)]
    document = hd.sr.Comprehensive3DSR if sr_class == "comprehensive-3d" else hd.sr.EnhancedSR
    sr = document(
        evidence=[_builder_view(view) for view in evidence],
        content=report[0],
        series_instance_uid=study_result_series_uid(
            study_uid, facts.model_sha256, "sr", facts.site_profile_sha256
        ),
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=len(ordered) + len(set_aside),
        manufacturer=MANUFACTURER,
        is_complete=True,
        requested_procedures=_referenced_requests(decider.source),
        contributing_equipment=[_contributing_equipment(facts)],
        series_description=STUDY_SR_SERIES_DESCRIPTION,
    )
    sr.copy_patient_and_study_information(first)
    _keep_filing_only(sr)
    _stamp(sr, _latest_time([image.source for image in ordered]))
    return _explicit_le(sr)


def _attention_group(
    source: Dataset, facts: ResultFacts, uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The attention map's peak as a TID 1501 group: its area (as a share of the image) inferred
    from the outlined cell, and a Comment naming it for what it is, which OHIF shows beside the
    outline. A TID 1410 group would carry the outline at the group level, where OHIF shows no
    text and PixelMed's validator then applies TID 1410 to every group of the report."""
    assert facts.cam_grid is not None
    rows, columns = int(source.Rows), int(source.Columns)
    outline = _hottest_cell_polygon(facts.cam_grid, rows, columns)
    width = float(outline[:, 0].max() - outline[:, 0].min())
    height = float(outline[:, 1].max() - outline[:, 1].min())
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=ATTENTION_IDENTIFIER),
        finding_type=PNEUMONIA,
        algorithm_id=_algorithm(facts),
        measurements=[
            hd.sr.Measurement(
                name=AREA,
                value=round(100.0 * width * height / (rows * columns), 2),
                unit=PERCENT,
                referenced_coordinates=[
                    hd.sr.CoordinatesForMeasurement(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=outline,
                        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
                    )
                ],
            )
        ],
    )
    group[0].ContentSequence.insert(
        _after_finding(group[0]), _text(COMMENT, "Attention map peak, not a detection")
    )
    return group


def _after_finding(group: Dataset) -> int:
    """The index just after a measurement group's Finding item (DCM 121071)."""
    for index, item in enumerate(group.ContentSequence):
        if item.ConceptNameCodeSequence[0].CodeValue == "121071":
            return index + 1
    return len(group.ContentSequence)


def _explicit_le(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _colour(values: np.ndarray) -> np.ndarray:
    """The heat map's colours (and its legend's), the viewer's own scale (`app.model.explain`), so
    that one map looks the same in the browser and in the PACS."""
    return np.asarray(colour(np.clip(values, 0.0, 1.0)), dtype=np.float64)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines


# The heat map keeps the source's own pixels up to this short side; a larger source is scaled down
# (keeping its aspect ratio) to it: its detail beyond that adds megabytes, not reading.
HEATMAP_MAX_SHORT_SIDE = 2048
HeatmapAnswers = Literal["all", "positive"]


def heatmap_size(columns: int, rows: int) -> tuple[int, int]:
    """The (width, height) of the heat map's image area for a source of `columns` x `rows`: the
    source's own size, or scaled to a short side of `HEATMAP_MAX_SHORT_SIDE` (aspect ratio kept to
    within a pixel) when it is larger."""
    short = min(columns, rows)
    if short <= HEATMAP_MAX_SHORT_SIDE:
        return columns, rows
    scale = HEATMAP_MAX_SHORT_SIDE / short
    return max(1, round(columns * scale)), max(1, round(rows * scale))


def heatmap_base(rendered_u8: np.ndarray) -> np.ndarray:
    """The source as the display pipeline rendered it (`app.imaging`), at `heatmap_size`."""
    if rendered_u8.dtype != np.uint8 or rendered_u8.ndim != 2:
        raise ValueError("rendered_u8 must be a 2-D uint8 grey image")
    rows, columns = rendered_u8.shape
    size = heatmap_size(columns, rows)
    if size == (columns, rows):
        return rendered_u8
    resized = Image.fromarray(rendered_u8).resize(size, Image.Resampling.BOX)
    return np.asarray(resized)


def heatmap_overlay(
    image_u8: np.ndarray,
    facts: ResultFacts,
    opacity: float = 0.45,
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """RGB pixels of the image area alone: the map over the grey image, no text.

    `input_size` is the model input's (width, height). The model input is the whole source resized
    without keeping its aspect ratio, so a cell's receptive field scales onto the picture per axis:
    `upsample` puts each cell's value at its field's centre there. None: `image_u8` is the model
    input itself. The map is min-max scaled over the image (its colours say where the evidence is
    relatively strongest, as in the answer's own pictures)."""
    if image_u8.dtype != np.uint8 or image_u8.ndim != 2:
        raise ValueError("image_u8 must be a 2-D uint8 grey image")
    if facts.cam_grid is None:
        raise ValueError("a heat map needs the answer's CAM grid")
    rows, columns = image_u8.shape
    grid = np.asarray(facts.cam_grid, dtype=np.float64)
    lo, hi = float(grid.min()), float(grid.max())
    grid = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    cam = upsample(grid, columns, rows, input_size)
    # the viewer's own colour scale and blend (app.model.explain): one map, one look
    return blend(image_u8, colour(np.clip(cam, 0.0, 1.0)), opacity)


def heatmap_headline(facts: ResultFacts) -> str:
    """What the map is of, and the answer: never the map's class as if it were the verdict."""
    relation = "at or above" if facts.positive else "below"
    return (
        f"Heat map: where the model saw evidence for {facts.positive_class} (class activation "
        f"map, relative). AI answer: {facts.label} (p({facts.positive_class}) = "
        f"{facts.positive_probability:.3f}, {relation} the threshold {facts.threshold:.3f}). "
        f"{facts.model_name} {facts.model_version}"
    )


def render_heatmap(
    image_u8: np.ndarray,
    facts: ResultFacts,
    opacity: float = 0.45,
    *,
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """RGB pixels: the image area (`heatmap_overlay`, untouched by text) with a band added below
    it that holds the headline (`heatmap_headline`), the colour legend and the disclaimer."""
    overlay = heatmap_overlay(image_u8, facts, opacity, input_size)
    rows, columns = image_u8.shape
    unit = max(12, min(48, columns // 64))
    font = _font(unit)
    margin = unit
    line = unit + unit // 3
    width = max(unit * 10, columns - 2 * margin)
    headline = _wrap(heatmap_headline(facts), font, width)
    disclaimer = _wrap(facts.disclaimer, font, width)
    legend_top = margin + len(headline) * line + unit // 2
    disclaimer_top = legend_top + line + unit // 2
    band = disclaimer_top + len(disclaimer) * line + margin
    canvas = Image.new("RGB", (columns, rows + band), (0, 0, 0))
    canvas.paste(Image.fromarray(overlay, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    top = rows
    for i, text in enumerate(headline):
        draw.text((margin, top + margin + i * line), text, fill=(255, 255, 255), font=font)
    # legend: a horizontal bar, "low" (least evidence) at the left, "high" at the right
    low_w = int(font.getlength("low ")) + 1
    bar_w = max(unit * 4, min(columns // 3, width - 2 * low_w - unit * 4))
    x0, y0 = margin + low_w, top + legend_top
    ramp = _colour(np.linspace(0.0, 1.0, bar_w))[None, :, :].repeat(unit, axis=0)
    canvas.paste(Image.fromarray(np.rint(ramp).astype(np.uint8), mode="RGB"), (x0, y0))
    draw.text((margin, y0), "low", fill=(255, 255, 255), font=font)
    draw.text((x0 + bar_w + unit // 3, y0), "high", fill=(255, 255, 255), font=font)
    for i, text in enumerate(disclaimer):
        draw.text((margin, top + disclaimer_top + i * line), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def build_heatmap_sc(
    source: Dataset,
    facts: ResultFacts,
    image_u8: np.ndarray,
    *,
    series_number: int = SC_SERIES_NUMBER,
    input_size: tuple[int, int] | None = None,
) -> Dataset:
    """A Secondary Capture of the heat map burned in over `image_u8`, with the headline, legend and
    disclaimer in a band below the image; BurnedInAnnotation YES.

    `image_u8` is the source rendered by the service's display pipeline (`heatmap_base`) and
    `input_size` the model input's (width, height); without `input_size`, `image_u8` is the model
    input itself (the picture the answer's explanation carries)."""
    source_uid = str(source.SOPInstanceUID)
    pixels = render_heatmap(image_u8, facts, input_size=input_size)
    orientation = source.get("PatientOrientation")
    evidence = _evidence_view(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_builder_view(evidence),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_series_uid(
            source_uid, facts.model_sha256, "sc", facts.site_profile_sha256, facts.pixel_digest
        ),
        series_number=series_number,
        sop_instance_uid=result_instance_uid(
            source_uid, facts.model_sha256, "sc", facts.site_profile_sha256, facts.pixel_digest
        ),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=(
            (str(orientation[0]), str(orientation[1]))
            if orientation is not None and len(orientation) == 2
            else ("L", "F")
        ),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_contributing_equipment(facts)],
        series_description=SC_SERIES_DESCRIPTION,
    )
    sc.copy_patient_and_study_information(evidence)
    _keep_filing_only(sc)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = facts.disclaimer[:10240]
    # dciodvfy's Type 2C rule on the General Series Laterality needs Body Part Examined present.
    sc.BodyPartExamined = source.get("BodyPartExamined", "CHEST")
    sc.DerivationDescription = (
        f"Class activation map of {facts.positive_class} over the source image, burned in; "
        f"the text in a band below the image; AI answer {facts.label}"
    )[:1024]
    sc.SourceImageSequence = [_reference(source)]
    _stamp(sc, ObjectTime.of_source(source))
    return _explicit_le(sc)


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def encode(ds: Dataset) -> bytes:
    """PS3.10 file bytes (preamble, file meta, data set) in the data set's transfer syntax."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


_KIND_OF_CLASS: dict[str, ObjectKind] = {
    COMPREHENSIVE_3D_SR: "sr",
    ENHANCED_SR: "sr-enhanced",
    SECONDARY_CAPTURE: "sc",
}


def wants_heatmap(facts: ResultFacts, heatmap_answers: HeatmapAnswers) -> bool:
    """Whether an answer gets a heat map: it has the positive class's map, and it is positive
    or the setting asks for every answer."""
    return facts.cam_grid is not None and (heatmap_answers == "all" or facts.positive)


def render_objects(
    source: Dataset,
    facts: ResultFacts,
    image_u8: np.ndarray | None = None,
    *,
    sr_class: SrClass = "comprehensive-3d",
    input_size: tuple[int, int] | None = None,
    heatmap_answers: HeatmapAnswers = "all",
) -> list[ResultObject]:
    """The encoded objects of one answer, ready for `Outbox.enqueue`: the SR always, the heat-map
    SC when the answer has a CAM grid of the positive class and the grey image is given
    (`build_heatmap_sc`), for every answer or (`heatmap_answers="positive"`) positive ones only."""
    objects = [build_sr(source, facts, sr_class=sr_class)]
    if wants_heatmap(facts, heatmap_answers) and image_u8 is not None:
        objects.append(build_heatmap_sc(source, facts, image_u8, input_size=input_size))
    return [
        ResultObject(
            kind=_KIND_OF_CLASS[str(ds.SOPClassUID)],
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            payload=encode(ds),
        )
        for ds in objects
    ]


def render_study_objects(
    images: Sequence[StudyImage],
    set_aside: Sequence[SetAsideImage],
    images_digest: str,
    *,
    sr_class: SrClass = "comprehensive-3d",
) -> list[ResultObject]:
    """The encoded study SR, ready for `Outbox.enqueue`."""
    ds = build_study_sr(images, set_aside, images_digest, sr_class=sr_class)
    return [
        ResultObject(
            kind=_KIND_OF_CLASS[str(ds.SOPClassUID)],
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            payload=encode(ds),
        )
    ]
