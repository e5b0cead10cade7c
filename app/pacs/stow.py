"""The core of a DICOMweb STOW-RS origin server (PS3.18 §10.5), free of any web framework.

The web layer reads the body (under its upload limit), calls `store_instances` with the body,
the Content-Type header and the `{study}` path segment, and sends back the `StoreResponse`'s
status, headers and body; `StowError` subclasses carry the status of a request refused whole
(400, 415), for the service's one error handler to answer in its own error shape.

Decisions where the standard leaves room:
- The request's media type must be `multipart/related`; its `type` parameter, when present,
  must be `application/dicom` (quoted or not), otherwise 415. A missing `type` is tolerated
  (PS3.18 §8.7.3.5 requires it, but each part's own Content-Type is checked anyway). A
  missing boundary is 400.
- Framing is strict: a body without the first delimiter, without the close delimiter, with a
  part missing its header/body separator, or with no part at all is 400 (bad syntax: "unable
  to store any Instances").
- A part whose Content-Type is not `application/dicom` is failed on its own (FailedSOPSequence,
  FailureReason 0xC000): the request as a whole is well formed and the other instances are
  stored. 415 is kept for a request type we do not serve (the metadata + bulk data encodings).
  A part without a Content-Type is read as `application/dicom`, the request's declared type.
- Per instance (FailureReason values from PS3.18 Table I.2-2):
  * not PS3.10 / unreadable header                            0xC000 (cannot understand)
  * no SOP Class UID or SOP Instance UID                      0xC000 (cannot be identified)
  * no Study or Series Instance UID                           0xA900 (does not match SOP class)
  * Study Instance UID differs from `{study}`                 0xA901
  * refused by the intended-use gate                          0x0122 (SOP class not supported)
  * the spool is full                                         0xA700 (out of resources)
  * any other failure while queueing                          0x0110 (processing failure)
- More than the configured number of parts: 413, the request refused whole while it is parsed
  (nothing stored, no per-part answer).
- Status (Table 10.5.3-1): 200 all stored; 202 some stored; 409 none stored; 503 with
  Retry-After when none was stored and every instance failed for lack of resources (PS3.18
  §8.5 general status), so a client retries instead of giving up.

The header is read without the pixel data, and a deflated data set is inflated under a ceiling.
Nothing read from an instance ends up in an exception message or a log line (patient data); the
response carries only UIDs, as the standard requires, and URLs built from them.

The body is scanned once with `bytes.find` (linear); each instance is copied once, into the
bytes handed to `accept`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset, FileDataset

from app.errors import InvalidImage
from app.imaging.boundary import PASS_THROUGH
from app.imaging.dicom import read_part10
from app.imaging.dicom.values import is_uid, uid
from app.pacs.spool import Spool, SpoolFull

# pydicom's warnings and log records, which quote header values, are silenced by
# `app.imaging.dicom` (its `read` module, imported above), whose reader this module uses.

DICOM_MEDIA_TYPE = "application/dicom"
RESPONSE_MEDIA_TYPE = "application/dicom+json"
MULTIPART_RELATED = "multipart/related"
RETRY_AFTER_SECONDS = 30
# Ceiling for an inflated (Deflated Explicit VR Little Endian) data set, as in the /predict path.
MAX_INFLATED_BYTES = 256 * 1024 * 1024

# FailureReason (0008,1197) values, PS3.18 Table I.2-2
OUT_OF_RESOURCES = 0xA700
MAX_BOUNDARY = 200
DOES_NOT_MATCH_SOP_CLASS = 0xA900
STUDY_MISMATCH = 0xA901
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122

Gate = Callable[[Dataset], "str | None"]
Accept = Callable[[Dataset, bytes], None]

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# An unquoted value is read leniently (RFC 2045 forbids "/" in a token, yet clients send
# `type=application/dicom` unquoted): anything up to the next separator.
_PARAMETER = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*([^\s;",]+|"(?:[^"\\]|\\.)*")', re.ASCII)
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN}/{_TOKEN})", re.ASCII)


class StowError(Exception):
    """A request refused as a whole; `status` is the HTTP status to answer."""

    status = 400


class MalformedRequest(StowError):
    """Bad syntax: a missing boundary, broken multipart framing (HTTP 400)."""

    status = 400


class TooManyParts(StowError):
    """More body parts than the request may hold (HTTP 413), found while parsing: refused whole
    before any part is read as DICOM."""

    status = 413


class UnsupportedMediaType(StowError):
    """A media type this origin server does not accept (HTTP 415)."""

    status = 415


class UnreadableInstance(Exception):
    """A part that is not a readable PS3.10 instance (no patient data in the message)."""


# -- the request's media type ------------------------------------------------------------------


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of a Content-Type value, names lower-cased, quotes removed."""
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise UnsupportedMediaType("the Content-Type is not a media type")
    params: dict[str, str] = {}
    position = match.end()
    while position < len(value.rstrip()):
        parameter = _PARAMETER.match(value, position)
        if parameter is None:
            raise MalformedRequest("the Content-Type parameters cannot be parsed")
        name, raw = parameter.group(1).lower(), parameter.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name] = raw
        position = parameter.end()
    return match.group(1).lower(), params


def parse_content_type(value: str) -> str:
    """The multipart boundary of a STOW-RS request's Content-Type.

    Accepts `multipart/related; type="application/dicom"; boundary=...` with the type and the
    boundary quoted or not. Raises `UnsupportedMediaType` for another media type or `type`,
    `MalformedRequest` for a missing or invalid boundary.
    """
    media, params = _media_type(value or "")
    if media != MULTIPART_RELATED:
        raise UnsupportedMediaType(
            f"STOW-RS takes {MULTIPART_RELATED}; type={DICOM_MEDIA_TYPE}, not {media}"
        )
    root_type = params.get("type", DICOM_MEDIA_TYPE).strip().lower()
    if root_type != DICOM_MEDIA_TYPE:
        safe = root_type if re.fullmatch(_TOKEN + "/" + _TOKEN, root_type) else "another type"
        raise UnsupportedMediaType(
            f"only PS3.10 instances (type={DICOM_MEDIA_TYPE}) are accepted, not type={safe}"
        )
    boundary = params.get("boundary")
    # RFC 2046 says 1 to 70 characters, not ending in a space; Orthanc's DICOMweb client (1.7)
    # sends 73 (two UUIDs joined), so longer ones are taken, within reason.
    if not boundary or len(boundary) > MAX_BOUNDARY or boundary.endswith(" "):
        raise MalformedRequest("the multipart Content-Type has no valid boundary parameter")
    return boundary


# -- multipart framing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One body part: its headers (names lower-cased) and its bytes."""

    headers: dict[str, str]
    data: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise MalformedRequest("a body part has a malformed header line")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


def iter_parts(body: bytes, boundary: str, max_parts: int | None = None) -> Iterator[Part]:
    """The parts of a multipart body, in order; `MalformedRequest` on broken framing,
    `TooManyParts` at the part after `max_parts` (counted as they are found, so that a body of
    empty parts costs no more than the limit).

    RFC 2046 §5.1.1: an optional preamble, then `--boundary` lines, each part being headers, an
    empty line, the data; the data ends at CRLF `--boundary`; the last delimiter is followed by
    `--`. Linear in the size of the body. The generator raises as it meets the fault, so a caller
    that has already used earlier parts must treat the request as malformed as a whole.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            raise MalformedRequest("the body does not contain the multipart boundary")
        position = first + 2 + len(delimiter)
    separator = b"\r\n" + delimiter
    count = 0
    while True:
        if body.startswith(b"--", position):
            if count == 0:
                raise MalformedRequest("the multipart body has no part")
            return
        # transport padding (spaces, tabs) may follow a delimiter before its CRLF
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise MalformedRequest("a multipart delimiter is not followed by a line break")
        start = line_end + 2
        end = body.find(separator, start)
        if end < 0:
            raise MalformedRequest("the multipart body has no closing boundary")
        if body.startswith(b"\r\n", start):  # no header lines at all
            headers_block, data_start = b"", start + 2
        else:
            blank = body.find(b"\r\n\r\n", start, end)
            if blank < 0:
                raise MalformedRequest("a body part has no blank line after its headers")
            headers_block, data_start = body[start:blank], blank + 4
        count += 1
        if max_parts is not None and count > max_parts:
            raise TooManyParts(f"a STOW-RS request holds at most {max_parts} parts")
        yield Part(_part_headers(headers_block), body[data_start:end])
        position = end + len(separator)


# -- one instance -------------------------------------------------------------------------------


def read_instance_header(data: bytes, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> FileDataset:
    """The data set of a PS3.10 instance up to (not including) its pixel data, read as the
    service reads uploads (`app.imaging.dicom.read_part10`: a deflated data set inflated under
    `max_inflated_bytes`). Raises `UnreadableInstance`, whose message names the fault, never a
    header value."""
    try:
        header = read_part10(data, max_inflated_bytes, stop_before_pixels=True)
        _convert_every_element(header)
        return header
    except InvalidImage as exc:
        raise UnreadableInstance(exc.message) from exc
    except UnreadableInstance:
        raise
    except BaseException as exc:
        # Whatever the parser raises (PanicException included) is this instance's fault, never
        # the request's or the association's; only what ends the process passes.
        if isinstance(exc, PASS_THROUGH):
            raise
        # pydicom's messages may quote header values: name the type only.
        raise UnreadableInstance(f"not a readable PS3.10 instance ({type(exc).__name__})") from None


def _convert_every_element(header: FileDataset) -> None:
    """Convert every element now, in sequences too. pydicom converts a raw value on its first
    access, so an element with a corrupted VR or value would otherwise raise in whoever reads it
    first (the gate, the UID check, the spool), long after the header was called readable."""
    for dataset in (header.file_meta, header):
        for _ in dataset.iterall():
            pass


def _uid(ds: Dataset, keyword: str) -> str | None:
    """`app.imaging.dicom.values.uid`, with a value that cannot be read counted as no UID."""
    try:
        return uid(ds, keyword)
    except Exception:
        return None


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one part: stored (`failure_reason` None) or failed, and why.

    `detail` is a short code fit for logs and metrics (never a header value).
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure_reason: int | None
    detail: str
    retrieve_url: str | None = None

    @property
    def stored(self) -> bool:
        return self.failure_reason is None


def _store_one(
    part: Part,
    study: str | None,
    gate: Gate,
    accept: Accept,
    instance_url: Callable[[str, str, str], str | None] | None,
) -> InstanceOutcome:
    if part.content_type is not None:
        try:
            media, _ = _media_type(part.content_type)
        except StowError:
            media = ""
        if media != DICOM_MEDIA_TYPE:
            return InstanceOutcome(None, None, CANNOT_UNDERSTAND, "part_not_application_dicom")
    try:
        ds = read_instance_header(part.data)
    except UnreadableInstance:
        return InstanceOutcome(None, None, CANNOT_UNDERSTAND, "unreadable")
    sop_class, sop_instance = _uid(ds, "SOPClassUID"), _uid(ds, "SOPInstanceUID")
    if sop_class is None or sop_instance is None:
        return InstanceOutcome(sop_class, sop_instance, CANNOT_UNDERSTAND, "no_sop_uids")
    study_uid, series_uid = _uid(ds, "StudyInstanceUID"), _uid(ds, "SeriesInstanceUID")
    if study_uid is None or series_uid is None:
        return InstanceOutcome(sop_class, sop_instance, DOES_NOT_MATCH_SOP_CLASS, "no_study_uids")
    if study is not None and study_uid != study:
        return InstanceOutcome(sop_class, sop_instance, STUDY_MISMATCH, "study_mismatch")
    try:
        refusal = gate(ds)
    except Exception:
        return InstanceOutcome(sop_class, sop_instance, PROCESSING_FAILURE, "gate_error")
    if refusal is not None:
        return InstanceOutcome(sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED, refusal)
    try:
        accept(ds, part.data)
    except SpoolFull:
        return InstanceOutcome(sop_class, sop_instance, OUT_OF_RESOURCES, "spool_full")
    except Exception:
        return InstanceOutcome(sop_class, sop_instance, PROCESSING_FAILURE, "queue_error")
    url = instance_url(study_uid, series_uid, sop_instance) if instance_url else None
    return InstanceOutcome(sop_class, sop_instance, None, "stored", url)


# -- the response ---------------------------------------------------------------------------------


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


@dataclass
class StoreResponse:
    """The answer to a STOW-RS request: HTTP status, headers, body (DICOM JSON), outcomes."""

    status: int
    outcomes: list[InstanceOutcome] = field(default_factory=list)
    study_url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def dicom_json(self) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 Table I.1-1) as a DICOM JSON object."""
        document: dict[str, Any] = {
            "00081190": _element("UR", self.study_url) if self.study_url else _element("UR")
        }
        failed = [o for o in self.outcomes if not o.stored]
        stored = [o for o in self.outcomes if o.stored]
        if failed:
            document["00081198"] = _element("SQ", *(_failed_item(o) for o in failed))
        if stored:
            document["00081199"] = _element("SQ", *(_referenced_item(o) for o in stored))
        return document

    @property
    def body(self) -> bytes:
        return json.dumps(self.dicom_json(), separators=(",", ":")).encode()


def _reference(outcome: InstanceOutcome) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item["00081150"] = _element("UI", outcome.sop_class_uid)
    if outcome.sop_instance_uid:
        item["00081155"] = _element("UI", outcome.sop_instance_uid)
    return item


def _failed_item(outcome: InstanceOutcome) -> dict[str, Any]:
    return {**_reference(outcome), "00081197": _element("US", outcome.failure_reason)}


def _referenced_item(outcome: InstanceOutcome) -> dict[str, Any]:
    url = _element("UR", outcome.retrieve_url) if outcome.retrieve_url else _element("UR")
    return {**_reference(outcome), "00081190": url}


def _status(outcomes: list[InstanceOutcome]) -> int:
    stored = sum(o.stored for o in outcomes)
    if stored == len(outcomes):
        return 200
    if stored:
        return 202
    if all(o.failure_reason == OUT_OF_RESOURCES for o in outcomes):
        return 503
    return 409


def store_instances(
    body: bytes,
    content_type: str,
    *,
    gate: Gate,
    accept: Accept,
    study: str | None = None,
    study_url: str | None = None,
    instance_url: Callable[[str, str, str], str | None] | None = None,
    max_parts: int | None = None,
) -> StoreResponse:
    """Handle one STOW-RS request: parse, check, gate and queue every instance.

    `gate(ds)` returns None to accept a header or a short reason code to refuse it; `accept(ds,
    data)` queues an accepted instance durably (it may raise `SpoolFull`); `study` is the
    `{study}` path segment, if any; `study_url` becomes the response's RetrieveURL and
    `instance_url(study, series, instance)` each stored instance's. Raises `MalformedRequest`
    (400), `TooManyParts` (413, more than `max_parts`) and `UnsupportedMediaType` (415);
    everything per instance is in the response.
    """
    boundary = parse_content_type(content_type)
    if study is not None and not is_uid(study):
        raise MalformedRequest("the study in the path is not a DICOM UID")
    # Framing is checked whole before anything is queued, so a 400 stores nothing.
    parts = list(iter_parts(body, boundary, max_parts))
    outcomes = [_store_one(part, study, gate, accept, instance_url) for part in parts]
    status = _status(outcomes)
    headers = {"Content-Type": RESPONSE_MEDIA_TYPE}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return StoreResponse(status, outcomes, study_url, headers)


def spool_accept(spool: Spool, source: str = "stow") -> Accept:
    """The `accept` that puts an instance into `spool` under its SOP Instance UID.

    The metadata holds only coded, non-identifying values: where it came from, its SOP class,
    its transfer syntax and when it arrived.
    """

    def accept(ds: Dataset, data: bytes) -> None:
        meta = {
            "source": source,
            "sop_class_uid": str(ds.get("SOPClassUID", "")),
            "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
            "received_at": datetime.now(UTC).isoformat(),
        }
        spool.put(str(ds.SOPInstanceUID), data, meta)

    return accept
