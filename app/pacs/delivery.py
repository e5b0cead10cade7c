"""Sending result objects to a PACS (DICOMweb STOW-RS or DIMSE C-STORE) from the outbox.

A destination sends a batch of objects and says, per object, whether it was stored, should be
retried (and when) or failed for good. `DeliveryWorker` is the loop around it: claim due
deliveries from the outbox, send them, settle them. Its log lines name the destination, the outcome
and the attempt count, never a UID or any header value.

An archive that already holds an instance under our UID (a re-send after the outbox purged its row,
or the same image read by two pods with outboxes of their own) may refuse the second copy: STOW-RS
409 or FailureReason 0x0111, C-STORE 0x0111. The object counts as delivered when the archive holds
the same result (`same_result`), which a DICOMweb destination checks by retrieving the archive's
copy (WADO-RS); DIMSE has no retrieve here, see `DimseDestination`.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import random
import re
import ssl
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from xml.etree import ElementTree

import httpx
import numpy as np
import pydicom

from app.audit import AuditEvent, AuditTrail, Participant
from app.pacs.outbox import Delivery, Outbox
from app.pacs.stow import DICOM_MEDIA_TYPE, StowError, iter_parts, parse_content_type

logger = logging.getLogger("app.pacs.delivery")

Verdict = Literal["stored", "retry", "failed"]

# Store Instances Response attributes (PS3.18 Annex I) in the DICOM JSON model
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_RETRYABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_PERMANENT_HTTP = frozenset({400, 404, 405, 409, 413, 415})
MAX_RETRY_AFTER_S = 3600.0
# Duplicate SOP Instance (PS3.7 C.4.2.1.4 for C-STORE; archives use it as a STOW FailureReason too)
DUPLICATE_SOP_INSTANCE = 0x0111
CONFLICT = 409


@dataclass(frozen=True)
class Outcome:
    """What happened to one object. `summary` is a status code or exception class, with a fixed
    phrase for a conflict's finding; never a UID or header value."""

    verdict: Verdict
    summary: str
    retry_after_s: float | None = None
    # The peer's own words (an HL7 ACK's error text, a FHIR OperationOutcome's diagnostics): kept
    # in the outbox after the summary, which may show it at /results; never logged.
    detail: str | None = None


class Destination(Protocol):
    name: str

    def send(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """One outcome per delivery, in order. Must not raise for network or peer failures."""
        ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), bounded."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    at = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - at), MAX_RETRY_AFTER_S)


def _values(container: Any, tag: str) -> list[Any]:
    element = container.get(tag) if isinstance(container, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values if isinstance(values, list) else []


def _json_instances(body: Any, sequence_tag: str) -> dict[str, int | None]:
    """SOP Instance UID -> FailureReason (if any) for the items of one response sequence."""
    found: dict[str, int | None] = {}
    for item in _values(body, sequence_tag):
        reasons = _values(item, _FAILURE_REASON)
        reason = reasons[0] if reasons and isinstance(reasons[0], int) else None
        for uid in _values(item, _REFERENCED_SOP_INSTANCE_UID):
            if isinstance(uid, str):
                found[uid] = reason
    return found


def _xml_instances(root: ElementTree.Element, sequence_tag: str) -> dict[str, int | None]:
    """The same from a PS3.19 Native DICOM Model answer (servers that reply only in XML)."""
    found: dict[str, int | None] = {}
    # `{*}`: any namespace (the model's is http://dicom.nema.org/PS3.19/models/NativeDICOM)
    for sequence in root.findall(f"{{*}}DicomAttribute[@tag='{sequence_tag}']"):
        for item in sequence.findall("{*}Item"):
            uids = item.findall(
                f"{{*}}DicomAttribute[@tag='{_REFERENCED_SOP_INSTANCE_UID}']/{{*}}Value"
            )
            reasons = item.findall(f"{{*}}DicomAttribute[@tag='{_FAILURE_REASON}']/{{*}}Value")
            reason_text = (reasons[0].text or "").strip() if reasons else ""
            reason = int(reason_text) if reason_text.isdigit() else None
            for uid in uids:
                if uid.text:
                    found[uid.text.strip()] = reason
    return found


def _store_response(
    response: httpx.Response,
) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(stored, failed) instances of a Store Instances Response in JSON or XML."""
    body = response.content
    if not body.strip():
        return {}, {}
    if body.lstrip()[:1] == b"<":
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            return {}, {}
        return (
            _xml_instances(root, _REFERENCED_SOP_SEQUENCE),
            _xml_instances(root, _FAILED_SOP_SEQUENCE),
        )
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return {}, {}
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    return (
        _json_instances(parsed, _REFERENCED_SOP_SEQUENCE),
        _json_instances(parsed, _FAILED_SOP_SEQUENCE),
    )


# What a result object says: an SR's document title and content tree, an image's pixels, a
# presentation state's annotations and display (VOI, polarity). The rest may differ between two
# copies of the same result (dates written by a renderer before they came from the source,
# attributes an archive coerces, the file meta) and is not compared.
_CONTENT_KEYWORDS = (
    "ConceptNameCodeSequence",
    "ContentSequence",
    "GraphicAnnotationSequence",
    "SoftcopyVOILUTSequence",
    "PresentationLUTShape",
)
_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)


def same_result(ours: bytes, theirs: bytes) -> str | None:
    """None when the archive's instance `theirs` is the same result as our `ours`, otherwise why
    not (a fixed phrase, no header value).

    The same result: byte for byte the same file, or the same SOP Class and Instance UID with the
    same content items (an SR's Concept Name and Content Sequence; a presentation state's Graphic
    Annotation and Softcopy VOI LUT Sequences and Presentation LUT Shape) and the same pixels (an
    image's Image Pixel description and pixel values, compared decoded when the archive sent them
    in another transfer syntax). The UIDs already fix the source image, the model and the site
    profile (`app.pacs.uids`); the content is what a reader sees.
    """
    if ours == theirs:
        return None
    mine = pydicom.dcmread(io.BytesIO(ours))
    try:
        archived = pydicom.dcmread(io.BytesIO(theirs))
        archived_uids = (archived.get("SOPClassUID"), archived.get("SOPInstanceUID"))
    except Exception:  # whatever the archive sent, it is not our result
        return "archive copy unreadable"
    if archived_uids != (mine.SOPClassUID, mine.SOPInstanceUID):
        return "archive copy has other uids"
    for keyword in _CONTENT_KEYWORDS:
        if keyword in mine and mine.get(keyword) != archived.get(keyword):
            return "archive copy content items differ"
    if "PixelData" in mine:
        if any(mine.get(k) != archived.get(k) for k in _PIXEL_KEYWORDS):
            return "archive copy pixel data differ"
        if mine.PixelData != archived.get("PixelData"):
            try:
                equal = np.array_equal(mine.pixel_array, archived.pixel_array)
            except Exception:  # an encoding this process cannot decode
                return "archive copy pixel data unreadable"
            if not equal:
                return "archive copy pixel data differ"
    return None


def _wado_instance(response: httpx.Response) -> bytes | None:
    """The one instance of a WADO-RS retrieve answer (multipart/related, or a bare
    application/dicom body), or None."""
    content_type = response.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() == DICOM_MEDIA_TYPE:
        return response.content
    try:
        parts = list(iter_parts(response.content, parse_content_type(content_type)))
    except StowError:
        return None
    return parts[0].data if len(parts) == 1 else None


class StowRsDestination:
    """DICOMweb STOW-RS: `POST {base_url}/studies`, one PS3.10 instance per multipart part.

    Success is decided per instance: stored only when the response's ReferencedSOPSequence lists
    our SOP Instance UID (Orthanc has answered 409 and 400 while storing one of two instances, and
    200 while storing none). Otherwise 408/429/5xx and network errors are retried (honouring
    Retry-After), as is a FailureReason of 0xA7xx (out of resources); 400/404/409/413/415 and
    other FailureReasons are permanent.

    An instance refused with 409, or with FailureReason 0x0111 (duplicate) under any status, may
    be one the archive already holds (Google's archive answers 409 to a second copy). Its copy is
    retrieved, `GET {base_url}/studies/{study}/series/{series}/instances/{instance}`, with the same
    credentials: the same result (`same_result`) is stored; a different one, or none (404), is
    failed with the refusal and the finding in the summary; a retrieve that meets 408/429/5xx or a
    network error is retried.
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        auth_header: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        accept: str = "application/dicom+json, application/dicom+xml;q=0.9",
        transport: httpx.BaseTransport | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # A site CA (and a client certificate) for HTTPS; None: the system's CAs
        self._verify: ssl.SSLContext | bool = tls if tls is not None else True
        # JSON preferred; some archives (dcm4chee) answer only in XML
        self.accept = accept
        self.name = name or f"stow:{self.base_url}"
        self._auth_header = auth_header
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._transport = transport

    def _body(self, deliveries: Sequence[Delivery]) -> tuple[bytes, str]:
        boundary = uuid.uuid4().hex
        parts = []
        for delivery in deliveries:
            parts.append(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
                + delivery.payload
                + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
        return body, f'multipart/related; type="application/dicom"; boundary={boundary}'

    def send(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        if not deliveries:
            return []
        body, content_type = self._body(deliveries)
        headers = {
            "Content-Type": content_type,
            "Accept": self.accept,
        }
        if self._auth_header:
            headers["Authorization"] = self._auth_header
        with httpx.Client(
            timeout=self._timeout, transport=self._transport, verify=self._verify
        ) as client:
            try:
                response = client.post(f"{self.base_url}/studies", content=body, headers=headers)
            except httpx.HTTPError as error:
                return [Outcome("retry", type(error).__name__)] * len(deliveries)
            stored, failed = _store_response(response)
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            outcomes = []
            for delivery in deliveries:
                uid = delivery.sop_instance_uid
                reason = failed.get(uid)
                summary = f"http {status} failure reason " + (
                    f"0x{reason:04X}" if reason is not None else "none"
                )
                if uid in stored:
                    outcomes.append(Outcome("stored", f"http {status}"))
                elif status in _RETRYABLE_HTTP or status in (401, 403):
                    # 401/403: a credential being rotated; bounded by the outbox's give-up age
                    outcomes.append(Outcome("retry", f"http {status}", retry_after))
                elif status == CONFLICT or reason == DUPLICATE_SOP_INSTANCE:
                    outcomes.append(self._compare_with_archive(client, delivery, summary))
                elif uid in failed:
                    resources = reason is not None and (reason & 0xFF00) == 0xA700
                    outcomes.append(
                        Outcome("retry" if resources else "failed", summary, retry_after)
                    )
                elif status in _PERMANENT_HTTP or 200 <= status < 300:
                    outcomes.append(Outcome("failed", f"http {status} instance not stored"))
                else:
                    outcomes.append(Outcome("retry", f"http {status}", retry_after))
        return outcomes

    def _compare_with_archive(
        self, client: httpx.Client, delivery: Delivery, refusal: str
    ) -> Outcome:
        """The outcome of an instance the archive refused as a conflict: stored when the archive's
        copy is the same result, failed when it differs or is not there (`refusal` kept)."""
        ours = pydicom.dcmread(io.BytesIO(delivery.payload), stop_before_pixels=True)
        url = (
            f"{self.base_url}/studies/{ours.StudyInstanceUID}/series/{ours.SeriesInstanceUID}"
            f"/instances/{ours.SOPInstanceUID}"
        )
        headers = {"Accept": f'multipart/related; type="{DICOM_MEDIA_TYPE}"'}
        if self._auth_header:
            headers["Authorization"] = self._auth_header
        try:
            response = client.get(url, headers=headers)
        except httpx.HTTPError as error:
            return Outcome("retry", f"{refusal}: retrieve {type(error).__name__}")
        if response.status_code in _RETRYABLE_HTTP:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Outcome("retry", f"{refusal}: retrieve http {response.status_code}", retry_after)
        if response.status_code != 200:
            return Outcome("failed", f"{refusal}: retrieve http {response.status_code}")
        theirs = _wado_instance(response)
        if theirs is None:
            return Outcome("failed", f"{refusal}: retrieve answer unreadable")
        difference = same_result(delivery.payload, theirs)
        if difference is not None:
            return Outcome("failed", f"{refusal}: {difference}")
        return Outcome("stored", f"{refusal}: archive holds the same result")


_AE_TITLE = re.compile(r"^[ -~]{1,16}$")


def client_tls_context(
    ca_file: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """DICOM TLS to a C-STORE peer: TLS 1.2 or later, the peer's certificate verified against
    `ca_file` and its host name (or IP address) checked; `cert`/`key` for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class DimseDestination:
    """DIMSE C-STORE to `AET@host:port`: one fresh association per batch, opened and released by
    the calling thread (pynetdicom associations are not shared across threads).

    Per object: status 0x0000 and warnings (0xB000, 0xB006, 0xB007) are stored; 0xA7xx (out of
    resources) and no answer (timeout, abort) are retried; other failures, and a SOP class the peer
    did not accept, are permanent. A refused or failed association is retried.

    0x0111 (duplicate SOP instance) is stored without a comparison: this destination has no
    C-GET/C-MOVE to read the archive's copy back. The UID alone stands for the result (it is
    derived from the source image, the model, the site profile and the kind of object, and the
    same reading renders the same bytes), so what the archive cannot show is only a copy whose
    content differs under the same reading, e.g. a probability computed on another execution
    provider; a DICOMweb destination checks that. The summary says it was not compared.
    """

    def __init__(
        self,
        called_ae_title: str,
        host: str,
        port: int,
        *,
        calling_ae_title: str = "PNEUMONIA_AI",
        name: str | None = None,
        acse_timeout_s: float = 15.0,
        dimse_timeout_s: float = 30.0,
        network_timeout_s: float = 30.0,
        connection_timeout_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        for title in (called_ae_title, calling_ae_title):
            if not _AE_TITLE.match(title) or "\\" in title or not title.strip():
                raise ValueError("AE titles are 1-16 printable ASCII characters, no backslash")
        self.called_ae_title = called_ae_title
        self.host = host
        self.port = port
        self.calling_ae_title = calling_ae_title
        self.name = name or f"dimse:{called_ae_title}@{host}:{port}"
        self._timeouts = (acse_timeout_s, dimse_timeout_s, network_timeout_s, connection_timeout_s)
        # DICOM TLS to the peer (`client_tls_context`): its certificate checked against the CA
        # and `host`; None: plain TCP.
        self.tls = tls

    @classmethod
    def parse(cls, spec: str, **options: Any) -> DimseDestination:
        """`AET@host:port`, e.g. `ORTHANC@127.0.0.1:4242`."""
        match = re.fullmatch(r"([^@]{1,16})@([^:@\s]+|\[[0-9a-fA-F:]+\]):([0-9]{1,5})", spec)
        if match is None:
            raise ValueError("a DIMSE destination is written AET@host:port")
        port = int(match.group(3))
        if not 0 < port < 65536:
            raise ValueError("the port must be 1-65535")
        return cls(match.group(1), match.group(2).strip("[]"), port, **options)

    def send(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        if not deliveries:
            return []
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout, ae.connection_timeout = (
            self._timeouts
        )
        for sop_class in dict.fromkeys(d.sop_class_uid for d in deliveries):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls_args = None if self.tls is None else (self.tls, self.host)
        try:
            assoc = ae.associate(
                self.host, self.port, ae_title=self.called_ae_title, tls_args=tls_args
            )
        except (OSError, RuntimeError, ValueError) as error:
            return [Outcome("retry", type(error).__name__)] * len(deliveries)
        if not assoc.is_established:
            refused = {cx.abstract_syntax for cx in assoc.rejected_contexts}
            if assoc.is_aborted and refused and not assoc.accepted_contexts:
                # the peer accepted none of the proposed SOP classes: the association is aborted
                # by pynetdicom, and sending again would change nothing
                return [
                    Outcome("failed", "sop class not accepted")
                    if d.sop_class_uid in refused
                    else Outcome("retry", "association failed")
                    for d in deliveries
                ]
            summary = "association rejected" if assoc.is_rejected else "association failed"
            return [Outcome("retry", summary)] * len(deliveries)
        outcomes: list[Outcome] = []
        try:
            for delivery in deliveries:
                outcomes.append(self._store(assoc, delivery))
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
        return outcomes

    @staticmethod
    def _store(assoc: Any, delivery: Delivery) -> Outcome:
        accepted = {
            cx.abstract_syntax for cx in assoc.accepted_contexts if cx.abstract_syntax is not None
        }
        if delivery.sop_class_uid not in accepted:
            return Outcome("failed", "sop class not accepted")
        if not assoc.is_established:
            return Outcome("retry", "association lost")
        dataset = pydicom.dcmread(io.BytesIO(delivery.payload))
        try:
            status = assoc.send_c_store(dataset)
        except (OSError, RuntimeError, ValueError, AttributeError) as error:
            return Outcome("retry", type(error).__name__)
        code = getattr(status, "Status", None)
        if code is None:
            return Outcome("retry", "no dimse response")
        code = int(code)
        summary = f"dimse status 0x{code:04X}"
        if code == 0x0000 or code in (0xB000, 0xB006, 0xB007):
            return Outcome("stored", summary)
        if code == DUPLICATE_SOP_INSTANCE:
            return Outcome("stored", f"{summary} duplicate - archive copy not compared")
        if (code & 0xFF00) == 0xA700:
            return Outcome("retry", summary)
        return Outcome("failed", summary)


class DeliveryWorker:
    """A thread that drains the outbox into its destinations until `stop()`.

    Backoff after the n-th failed attempt: `base_backoff_s * 2**(n-1)`, jittered by up to a tenth,
    capped at `max_backoff_s`; a Retry-After from the peer takes precedence when longer (bounded
    by an hour). Deliveries for a destination this worker does not know are left to others.
    Results past their retention (`Outbox.purge_expired`: delivered or failed for `retention_s`,
    or stored that long with no delivery) are purged, checked every `purge_every_s`.
    """

    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Destination],
        *,
        worker_id: str | None = None,
        batch_size: int = 16,
        poll_interval_s: float = 1.0,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        retention_s: float = 7 * 24 * 3600.0,
        purge_every_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.destinations: Mapping[str, Destination] = {d.name: d for d in destinations}
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.retention_s = retention_s
        self.purge_every_s = purge_every_s
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0
        # The audit trail's "results exported" (app.audit), when the service keeps one.
        self.audit: AuditTrail | None = None
        self.counts: dict[str, int] = defaultdict(int)
        # (destination, outcome) -> attempts: delivered, retry, failed
        self.counts_by_destination: dict[tuple[str, str], int] = defaultdict(int)

    def backoff_s(self, attempts: int, retry_after_s: float | None = None) -> float:
        delay = min(self.max_backoff_s, self.base_backoff_s * 2.0 ** max(0, attempts - 1))
        delay = min(self.max_backoff_s, delay * (1.0 + random.uniform(0.0, 0.1)))
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
        return delay

    def run_once(self) -> int:
        """One claim-send-settle round; returns how many deliveries it handled."""
        now = self._clock()
        claimed = self.outbox.claim(self.worker_id, now=now, limit=self.batch_size)
        mine = [d for d in claimed if d.destination in self.destinations]
        # A row for a destination this process has no configuration for: hand it back at once.
        for delivery in claimed:
            if delivery.destination not in self.destinations:
                self.outbox.mark_retry(delivery, self.poll_interval_s, "unknown destination")
        by_destination: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in mine:
            by_destination[delivery.destination].append(delivery)
        for name, batch in by_destination.items():
            try:
                outcomes = self.destinations[name].send(batch)
            except Exception as error:  # a destination bug must not kill the worker
                outcomes = [Outcome("retry", type(error).__name__)] * len(batch)
            if len(outcomes) != len(batch):
                outcomes = [Outcome("retry", "destination returned wrong count")] * len(batch)
            for delivery, outcome in zip(batch, outcomes, strict=True):
                self._settle(name, delivery, outcome)
        if now - self._last_purge >= self.purge_every_s:
            self._last_purge = now
            self.outbox.purge_expired(self.retention_s, now=now)
        return len(mine)

    def _settle(self, name: str, delivery: Delivery, outcome: Outcome) -> None:
        now = self._clock()
        kept = outcome.summary if outcome.detail is None else f"{outcome.summary}: {outcome.detail}"
        state: str
        if outcome.verdict == "stored":
            self.outbox.mark_delivered(delivery, now=now)
            state = "delivered"
            if self.audit is not None:
                self.audit.record(
                    AuditEvent(
                        "results_exported",
                        participants=(
                            Participant(self.audit.source_id, True),
                            Participant(name, False),
                        ),
                        sop_instance_uids=(delivery.sop_instance_uid,),
                    )
                )
        elif outcome.verdict == "failed":
            self.outbox.mark_failed(delivery, kept, now=now)
            state = "failed"
        else:
            delay = self.backoff_s(delivery.attempts, outcome.retry_after_s)
            state = self.outbox.mark_retry(delivery, delay, kept, now=now)
            if state == "pending":
                state = "retry"
        self.counts[state] += 1
        self.counts_by_destination[(name, state)] += 1
        log = logger.warning if state == "failed" else logger.info
        log(
            "pacs delivery destination=%s kind=%s outcome=%s status=%s attempts=%d",
            name,
            delivery.kind,
            state,
            outcome.summary,
            delivery.attempts,
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except Exception as error:  # e.g. the database briefly unreachable
                logger.warning("pacs delivery round failed: %s", type(error).__name__)
                handled = 0
            if handled < self.batch_size:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()

    def wake(self) -> None:
        """Start the next round now (call after `Outbox.enqueue`) instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the worker is already started")
        self._thread = threading.Thread(target=self._loop, name="pacs-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Ask the loop to stop and wait up to `timeout_s`; True when it has stopped."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
        # destinations that keep a connection open (MLLP, FHIR) close it with the loop's end
        for destination in self.destinations.values():
            close = getattr(destination, "close", None)
            if callable(close):
                close()
        return True
