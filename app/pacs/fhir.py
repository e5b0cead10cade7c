"""The result as a FHIR R4 (4.0.1) transaction, and its delivery to a FHIR server.

`render_bundle` writes one transaction Bundle per result (the profile, element by element, is in
docs/CONFORMANCE.md, "FHIR R4"):

- Patient, by the source's Patient ID under the site's identifier system;
- ServiceRequest, by the accession number (identifier type ACSN), when the image has one;
- ImagingStudy, by the study instance UID (`urn:dicom:uid` / `urn:oid:...`);
- Device, the algorithm: by its device UID (the one the SR names), model name, version, sha256;
- Observation: the finding (SNOMED CT Pneumonia) with the calibrated probability as its
  valueQuantity, POS/NEG as its interpretation, the threshold as a component, the Device;
- DiagnosticReport: status preliminary, category RAD, LOINC 36554-4 (XR Chest Single view) or the
  image's procedure code, conclusion and conclusionCode, `imagingStudy` and `result`.

Every entry is a conditional create (`ifNoneExist` on its identifier), so a re-sent Bundle finds
what the first one made and creates nothing; the entries refer to each other by their `urn:uuid:`
full URLs, which the server resolves to what it created or found. The identifiers of the report and
the observation are `urn:oid:` UIDs derived from the result, so they are the same in every re-send.
Nothing here is R5-only (no `DiagnosticReport.study`, no `Observation.triggeredBy`).

`FhirDestination` POSTs the Bundle to the base URL, over one HTTP client kept for the worker's
thread (bearer token or mutual TLS): 200 is delivered; 408, 429, 5xx, network errors and timeouts
are retried (honouring Retry-After), as are 401/403 (a credential being rotated; bounded by the
give-up age); any other 4xx is final, with the OperationOutcome's issue code in the summary and its
diagnostics kept in the outbox, never logged.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.pacs.delivery import Outcome, parse_retry_after
from app.pacs.objects import ResultFacts
from app.pacs.outbox import Delivery, ResultObject
from app.pacs.ris import (
    ABSENT,
    FHIR_KIND,
    FHIR_MEDIA_TYPE,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    OrderFacts,
    message_uid,
)
from app.pacs.uids import device_uid

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
URI = "urn:ietf:rfc:3986"
DICOM_UID = "urn:dicom:uid"
_SYSTEMS = {"SCT": SNOMED, "LN": LOINC, "DCM": DCM}
_RETRYABLE = frozenset({401, 403, 408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FhirProfile:
    """The site's identifier systems: the patient identifiers its MPI uses and its accession
    numbers (the RIS's, as its ServiceRequests carry them)."""

    patient_id_system: str = "urn:local:patient-id"
    accession_system: str = "urn:local:accession"


def _uid(base: str, part: str) -> str:
    """A `2.25` UID for one resource of a Bundle, derived from the Bundle's own."""
    digest = hashlib.sha256(f"{base}\x00{part}".encode("ascii")).digest()[:16]
    value = uuid.UUID(bytes=digest).int
    value = (value & ~(0xF << 76) | (0x8 << 76)) & ~(0x3 << 62) | (0x2 << 62)
    return f"2.25.{value}"


def _full_url(base: str, part: str) -> str:
    return "urn:uuid:" + str(uuid.UUID(int=int(_uid(base, part).split(".")[2])))


def _search_value(text: str) -> str:
    """A token search parameter's part: FHIR's own escapes, then URL encoding."""
    for special in ("\\", "|", ",", "$"):
        text = text.replace(special, "\\" + special)
    return urllib.parse.quote(text, safe=":/.-_~")


def _if_none_exist(system: str, value: str) -> str:
    return f"identifier={_search_value(system)}|{_search_value(value)}"


def _coding(code: tuple[str, str, str]) -> dict[str, str]:
    return {"system": _SYSTEMS.get(code[2], code[2]), "code": code[0], "display": code[1]}


def _date(dicom_date: str) -> str:
    return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:8]}"


def _offset(dicom_offset: str) -> str:
    """`+hh:mm` from the source's Timezone Offset From UTC, else this process's local zone (set
    TZ to the site's zone when the images carry none)."""
    if len(dicom_offset) == 5 and dicom_offset[0] in "+-" and dicom_offset[1:].isdigit():
        return f"{dicom_offset[:3]}:{dicom_offset[3:]}"
    seconds = -time.altzone if time.localtime().tm_isdst > 0 else -time.timezone
    sign = "+" if seconds >= 0 else "-"
    return f"{sign}{abs(seconds) // 3600:02d}:{abs(seconds) % 3600 // 60:02d}"


def _date_time(source: OrderFacts) -> str:
    """FHIR dateTime of the observation (a time needs a zone in FHIR)."""
    clock = source.observed.time.split(".")[0].ljust(6, "0")
    fraction = source.observed.time.split(".")[1][:3] if "." in source.observed.time else ""
    return (
        f"{_date(source.observed.date)}T{clock[:2]}:{clock[2:4]}:{clock[4:6]}"
        + (f".{fraction}" if fraction else "")
        + _offset(source.timezone_offset)
    )


def _entry(full_url: str, resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist,
        },
    }


def render_bundle(
    source: OrderFacts,
    facts: ResultFacts,
    result_key: str,
    profile: FhirProfile,
    *,
    warnings: Sequence[str] = (),
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> ResultObject:
    """The transaction Bundle of one result, as an outbox object of kind `fhir-bundle` (JSON)."""
    uid = message_uid(result_key, FHIR_KIND)
    issued = clock().astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    effective = _date_time(source)
    entries: list[dict[str, Any]] = []

    patient_url = _full_url(uid, "patient")
    if source.patient_id:
        patient_identifier = (profile.patient_id_system, source.patient_id)
    else:
        # no Patient ID in the image: a patient of this result alone, never merged with another
        patient_identifier = (URI, f"urn:oid:{_uid(uid, 'patient')}")
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": patient_identifier[0], "value": patient_identifier[1]}],
    }
    name = source.patient_name
    if not name.empty:
        human: dict[str, Any] = {}
        if name.family:
            human["family"] = name.family
        given = [g for g in (name.given, name.middle) if g]
        if given:
            human["given"] = given
        if name.prefix:
            human["prefix"] = [name.prefix]
        if name.suffix:
            human["suffix"] = [name.suffix]
        patient["name"] = [human]
    gender = {"M": "male", "F": "female", "O": "other"}.get(source.sex)
    if gender:
        patient["gender"] = gender
    if source.birth_date:
        patient["birthDate"] = _date(source.birth_date)
    entries.append(_entry(patient_url, patient, _if_none_exist(*patient_identifier)))
    subject = {"reference": patient_url}

    procedure = {
        "coding": [
            {
                "system": _SYSTEMS.get(source.procedure.scheme, source.procedure.scheme),
                "code": source.procedure.code,
                "display": source.procedure.meaning,
            }
        ],
        "text": source.procedure_text,
    }
    based_on: list[dict[str, str]] = []
    if source.accession_number:
        order_url = _full_url(uid, "service-request")
        order = {
            "resourceType": "ServiceRequest",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                                "display": "Accession ID",
                            }
                        ]
                    },
                    "system": profile.accession_system,
                    "value": source.accession_number,
                }
            ],
            # made only when the RIS has no order with that accession number, which it should
            "status": "unknown",
            "intent": "order",
            "code": procedure,
            "subject": subject,
        }
        entries.append(
            _entry(
                order_url, order, _if_none_exist(profile.accession_system, source.accession_number)
            )
        )
        based_on = [{"reference": order_url}]

    study_url = _full_url(uid, "imaging-study")
    study_identifier = (DICOM_UID, f"urn:oid:{source.study_instance_uid}")
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": study_identifier[0], "value": study_identifier[1]}],
        "status": "available",
        "subject": subject,
    }
    if based_on:
        study["basedOn"] = based_on
    entries.append(_entry(study_url, study, _if_none_exist(*study_identifier)))

    device_url = _full_url(uid, "device")
    device_identifier = (DICOM_UID, f"urn:oid:{device_uid(facts.model_sha256)}")
    device = {
        "resourceType": "Device",
        "identifier": [{"system": device_identifier[0], "value": device_identifier[1]}],
        "manufacturer": "pneumonia-screening",
        "deviceName": [{"name": facts.model_name, "type": "model-name"}],
        "type": {"text": "AI algorithm (research use only)"},
        "version": [
            {"type": {"text": "model version"}, "value": facts.model_version},
            {"type": {"text": "onnx sha256"}, "value": facts.model_sha256},
            *(
                [{"type": {"text": "site profile sha256"}, "value": facts.site_profile_sha256}]
                if facts.site_profile_sha256
                else []
            ),
        ],
    }
    entries.append(_entry(device_url, device, _if_none_exist(*device_identifier)))

    finding = PRESENT if facts.positive else ABSENT
    observation_url = _full_url(uid, "observation")
    observation_identifier = (URI, f"urn:oid:{_uid(uid, 'observation')}")
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": observation_identifier[0], "value": observation_identifier[1]}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "code": {"coding": [_coding(PNEUMONIA)], "text": "Pneumonia (AI screening)"},
        "subject": subject,
        "effectiveDateTime": effective,
        "issued": issued,
        "valueQuantity": {
            "value": round(facts.positive_probability, 6),
            "unit": "probability",
            "system": UCUM,
            "code": "1",
        },
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if facts.positive else "NEG",
                        "display": "Positive" if facts.positive else "Negative",
                    }
                ]
            }
        ],
        "note": [{"text": facts.disclaimer}, *({"text": w} for w in warnings)],
        "method": {
            "coding": [_coding(PROBABILITY)],
            "text": f"{facts.model_name} {facts.model_version}, onnx sha256={facts.model_sha256}",
        },
        "device": {"reference": device_url},
        "derivedFrom": [{"reference": study_url}],
        "component": [
            {
                "code": {"coding": [_coding(THRESHOLD)]},
                "valueQuantity": {
                    "value": round(facts.threshold, 6),
                    "unit": "probability",
                    "system": UCUM,
                    "code": "1",
                },
            },
            {
                "code": {"coding": [_coding(PNEUMONIA)]},
                "valueCodeableConcept": {"coding": [_coding(finding)]},
            },
        ],
    }
    if based_on:
        observation["basedOn"] = based_on
    entries.append(_entry(observation_url, observation, _if_none_exist(*observation_identifier)))

    report_identifier = (URI, f"urn:oid:{_uid(uid, 'diagnostic-report')}")
    label = "Pneumonia likely" if facts.positive else "Pneumonia not detected"
    conclusion = (
        f"{label} at the operating point (AI screening, preliminary): probability "
        f"{facts.positive_probability:.4f}, threshold {facts.threshold:.4f}. {facts.disclaimer}"
    )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": report_identifier[0], "value": report_identifier[1]}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": procedure,
        "subject": subject,
        "effectiveDateTime": effective,
        "issued": issued,
        "result": [{"reference": observation_url}],
        "imagingStudy": [{"reference": study_url}],
        "conclusion": conclusion,
        "conclusionCode": [
            {
                "coding": [_coding(PNEUMONIA if facts.positive else ABSENT)],
                "text": label,
            }
        ],
    }
    if based_on:
        report["basedOn"] = based_on
    entries.append(
        _entry(_full_url(uid, "diagnostic-report"), report, _if_none_exist(*report_identifier))
    )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    payload = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return ResultObject(FHIR_KIND, FHIR_MEDIA_TYPE, uid, payload)


def _operation_outcome(response: httpx.Response) -> tuple[str, str | None]:
    """(the first issue's code, its diagnostics or details text) of an OperationOutcome body."""
    try:
        body = response.json()
    except ValueError:
        return "", None
    issues = body.get("issue") if isinstance(body, dict) else None
    if body.get("resourceType") != "OperationOutcome" or not isinstance(issues, list) or not issues:
        return "", None
    first = issues[0] if isinstance(issues[0], dict) else {}
    details = first.get("details") if isinstance(first.get("details"), dict) else {}
    text = first.get("diagnostics") or (details or {}).get("text")
    code = str(first.get("code") or "")
    return ("".join(c for c in code if c.isalnum() or c == "-")[:40], str(text) if text else None)


def _transaction_summary(response: httpx.Response) -> str:
    """`fhir 200` with how many entries the server created (201) and found (200)."""
    try:
        body = response.json()
        statuses = [str(e["response"]["status"]).split()[0] for e in body.get("entry", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"fhir {response.status_code}"
    created = sum(s == "201" for s in statuses)
    return f"fhir {response.status_code} created {created} existing {len(statuses) - created}"


class FhirDestination:
    """A FHIR R4 server taking transaction Bundles at `base_url` (`POST {base_url}`).

    `auth_header` is sent as `Authorization` (e.g. `Bearer <token>`); `client_cert` (and
    `client_key`) present a client certificate for mutual TLS; `ca_file` replaces the system's
    trusted roots. One `httpx.Client`, made on first use and kept: its connections are reused.
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        auth_header: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name or f"fhir:{self.base_url}"
        self._auth_header = auth_header
        self._cert = (
            None
            if client_cert is None
            else (str(client_cert), str(client_key))
            if client_key is not None
            else str(client_cert)
        )
        self._verify: str | bool = str(ca_file) if ca_file is not None else True
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._transport = transport
        self._client: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                timeout=self._timeout,
                transport=self._transport,
                cert=self._cert,
                verify=self._verify,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def send(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        outcomes = []
        for delivery in deliveries:
            outcomes.append(self._send_one(delivery))
        return outcomes

    def _send_one(self, delivery: Delivery) -> Outcome:
        headers = {"Content-Type": FHIR_MEDIA_TYPE, "Accept": FHIR_MEDIA_TYPE}
        if self._auth_header:
            headers["Authorization"] = self._auth_header
        try:
            response = self._http().post(self.base_url, content=delivery.payload, headers=headers)
        except httpx.HTTPError as error:
            return Outcome("retry", f"fhir {type(error).__name__}")
        status = response.status_code
        if status == 200:
            return Outcome("stored", _transaction_summary(response))
        if status in _RETRYABLE:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Outcome("retry", f"fhir {status}", retry_after)
        code, text = _operation_outcome(response)
        summary = f"fhir {status}" + (f" {code}" if code else "")
        if 400 <= status < 500:
            return Outcome("failed", summary, detail=text)
        # a 2xx other than 200, a redirect, an unknown status: not a transaction answer
        return Outcome("retry", summary, detail=text)
