"""What a RIS needs to file a result against its order, read once from the source image.

The HL7 v2 ORU^R01 (`app.pacs.hl7`) and the FHIR R4 transaction (`app.pacs.fhir`) are two more
renderings of the same answer as the DICOM objects (`app.pacs.objects`): the facts of the reading
come from `ResultFacts`, the facts of the order and the patient from the source's DICOM patient,
study and request attributes (`OrderFacts`). Both messages are rendered once, when the result is
recorded, and stored in the outbox beside the DICOM objects, so that every re-send carries the same
bytes, the same HL7 control ID and the same FHIR identifiers.

A message is an outbox object like an SR: it has a kind (`hl7-oru`, `fhir-bundle`) and a UID of its
own in the `2.25` arc, derived from the result key and the kind (`message_uid`), which is what
`/results/{uid}` and the delivery states show for it; its `sop_class_uid` column holds the media
type instead of a SOP class.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset

from app.pacs.objects import ObjectTime

MessageKind = Literal["hl7-oru", "fhir-bundle"]
HL7_KIND: MessageKind = "hl7-oru"
FHIR_KIND: MessageKind = "fhir-bundle"
HL7_MEDIA_TYPE = "x-application/hl7-v2+er7"
FHIR_MEDIA_TYPE = "application/fhir+json"

# LOINC 36554-4 "XR Chest Single view": the procedure when the source names none.
CHEST_XRAY = ("36554-4", "XR Chest Single view", "LN")
# SNOMED CT: the finding, and the qualifier values for its presence.
PNEUMONIA = ("233604007", "Pneumonia", "SCT")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("2667000", "Absent", "SCT")
# DICOM (DCM) concepts, as in the SR.
PROBABILITY = ("122157", "Probability", "DCM")
THRESHOLD = ("122411", "Threshold Value", "DCM")
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
ALGORITHM_PARAMETERS = ("111002", "Algorithm Parameters", "DCM")
STUDY_INSTANCE_UID = ("110180", "Study Instance UID", "DCM")


def message_uid(result_key: str, kind: MessageKind) -> str:
    """The UID of one message of one result (`2.25.<n>`, a version 8 UUID as for the objects)."""
    digest = hashlib.sha256("\x00".join(("pneumonia-ris-message", result_key, kind)).encode())
    as_uuid = uuid.UUID(bytes=digest.digest()[:16])
    value = (as_uuid.int & ~(0xF << 76) | (0x8 << 76)) & ~(0x3 << 62) | (0x2 << 62)
    return f"2.25.{value}"


@dataclass(frozen=True)
class PersonName:
    """A DICOM PN's alphabetic group, split into its five components."""

    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    @classmethod
    def of(cls, value: object) -> PersonName:
        alphabetic = str(value or "").split("=")[0]
        parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
        return cls(*parts[:5])

    @property
    def empty(self) -> bool:
        return not any((self.family, self.given, self.middle, self.prefix, self.suffix))


@dataclass(frozen=True)
class CodedProcedure:
    code: str
    meaning: str
    scheme: str


@dataclass(frozen=True)
class OrderFacts:
    """The patient, order and study of a source image, as its DICOM header gives them.

    Empty strings where the header has nothing; the renderers leave those fields out.
    """

    patient_id: str
    issuer_of_patient_id: str
    patient_name: PersonName
    birth_date: str
    sex: str
    accession_number: str
    placer_order_number: str
    filler_order_number: str
    study_instance_uid: str
    procedure: CodedProcedure
    procedure_text: str
    observed: ObjectTime
    timezone_offset: str

    @classmethod
    def of_source(cls, source: Dataset) -> OrderFacts:
        request = (source.get("RequestAttributesSequence") or [Dataset()])[0]
        codes = (
            source.get("ProcedureCodeSequence")
            or request.get("RequestedProcedureCodeSequence")
            or []
        )
        procedure = CodedProcedure(*CHEST_XRAY)
        if codes and codes[0].get("CodeValue") and codes[0].get("CodingSchemeDesignator"):
            item = codes[0]
            procedure = CodedProcedure(
                _text(item.get("CodeValue")),
                _text(item.get("CodeMeaning")),
                _text(item.get("CodingSchemeDesignator")),
            )
        return cls(
            patient_id=_text(source.get("PatientID")),
            issuer_of_patient_id=_text(source.get("IssuerOfPatientID")),
            patient_name=PersonName.of(source.get("PatientName")),
            birth_date=_date(source.get("PatientBirthDate")),
            sex=_text(source.get("PatientSex")).upper(),
            accession_number=_text(source.get("AccessionNumber")),
            placer_order_number=_text(
                source.get("PlacerOrderNumberImagingServiceRequest")
                or request.get("PlacerOrderNumberImagingServiceRequest")
            ),
            filler_order_number=_text(
                source.get("FillerOrderNumberImagingServiceRequest")
                or request.get("FillerOrderNumberImagingServiceRequest")
            ),
            study_instance_uid=_text(source.get("StudyInstanceUID")),
            procedure=procedure,
            procedure_text=_text(
                source.get("RequestedProcedureDescription")
                or request.get("RequestedProcedureDescription")
                or source.get("StudyDescription")
            )
            or procedure.meaning,
            observed=ObjectTime.of_source(source),
            timezone_offset=_text(source.get("TimezoneOffsetFromUTC")),
        )


def _text(value: object) -> str:
    return " ".join(str(value or "").split())


def _date(value: object) -> str:
    text = _text(value)
    return text if len(text) == 8 and text.isdigit() else ""
