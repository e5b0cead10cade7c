"""The audit trail as hospitals collect it: DICOM audit messages (PS3.15 A.5, the IHE ATNA
profile's schema) sent as RFC 5424 syslog over TCP (RFC 6587 octet counting), or TLS (RFC 5425),
to the site's audit record repository.

Events (PS3.15 A.5.3, with their DCM codes):

- `instances_received`: 110104 DICOM Instances Transferred, action C: an X-ray arrived (C-STORE,
  STOW-RS);
- `results_exported`: 110106 Export, action R: a result object reached a destination;
- `results_read`: 110103 DICOM Instances Accessed, action R: `GET /results/...` answered;
- `authentication_failed`: 110114 User Authentication, action E, outcome 4: an API key refused;
- `security_alert`: 110113 Security Alert, action E: a refused DICOM peer, an aborted association.

What a message names: the service (AuditSourceIdentification), the active participants (the
client's address, an API key by its id, never the key; an AE title), and the objects by their
UIDs (study, SOP instances). No patient name, id or other header value enters a message: the UIDs
are what an audit repository joins to the PACS's own records.

Sending never blocks the caller: messages go to a bounded queue that one thread writes to the
collector, reconnecting with a pause; when the queue is full or the collector is gone, messages
are dropped and counted (`dropped`), and the service's log says so once per outage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.sax.saxutils import quoteattr

logger = logging.getLogger(__name__)

# RFC 5424: facility 10 (security/authorization, "authpriv"), severity 5 (notice) for success,
# 4 (warning) for failures. PRI = facility * 8 + severity.
_FACILITY = 10
APP_NAME = "cxr-ai"
MSG_ID = "IHE+DICOM"  # the ATNA profile's MSGID for a DICOM audit message

_EVENTS: dict[str, tuple[str, str, str]] = {
    # event: (EventID code, its meaning, EventActionCode)
    "instances_received": ("110104", "DICOM Instances Transferred", "C"),
    "results_exported": ("110106", "Export", "R"),
    "results_read": ("110103", "DICOM Instances Accessed", "R"),
    "authentication_failed": ("110114", "User Authentication", "E"),
    "security_alert": ("110113", "Security Alert", "E"),
}
# EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
OUTCOMES = {"success": "0", "minor_failure": "4", "serious_failure": "8", "major_failure": "12"}


@dataclass(frozen=True)
class Participant:
    """An active participant: who or what took part (a client address, a key id, an AE title)."""

    user_id: str
    requestor: bool
    address: str | None = None  # network access point: an IP address
    role: tuple[str, str] | None = None  # (DCM code, meaning), e.g. ("110153", "Source Role ID")


@dataclass(frozen=True)
class AuditEvent:
    event: str  # a key of _EVENTS
    outcome: str = "success"  # a key of OUTCOMES
    participants: tuple[Participant, ...] = ()
    study_uids: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()
    detail: str | None = None  # a fixed, non-identifying reason (a security alert's kind)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _code(code: str, meaning: str) -> str:
    return f'csd-code="{code}" codeSystemName="DCM" originalText={quoteattr(meaning)}'


def audit_xml(event: AuditEvent, source_id: str) -> str:
    """The DICOM audit message (PS3.15 A.5.1) for one event."""
    code, meaning, action = _EVENTS[event.event]
    when = event.at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [
        "<AuditMessage>",
        f'<EventIdentification EventActionCode="{action}" EventDateTime="{when}" '
        f'EventOutcomeIndicator="{OUTCOMES[event.outcome]}">',
        f"<EventID {_code(code, meaning)}/>",
    ]
    if event.detail:
        parts.append(f"<EventOutcomeDescription>{_text(event.detail)}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    for p in event.participants:
        address = (
            f" NetworkAccessPointID={quoteattr(p.address)} NetworkAccessPointTypeCode="
            f'"{"2" if _is_ip(p.address) else "1"}"'
            if p.address
            else ""
        )
        parts.append(
            f"<ActiveParticipant UserID={quoteattr(p.user_id)} "
            f'UserIsRequestor="{"true" if p.requestor else "false"}"{address}>'
        )
        if p.role:
            parts.append(f"<RoleIDCode {_code(*p.role)}/>")
        parts.append("</ActiveParticipant>")
    parts.append(f"<AuditSourceIdentification AuditSourceID={quoteattr(source_id)}/>")
    for uid in event.study_uids:
        parts.append(_object(uid, "110180", "Study Instance UID"))
    for uid in event.sop_instance_uids:
        parts.append(_object(uid, "110181", "SOP Instance UID"))
    parts.append("</AuditMessage>")
    return "".join(parts)


def _object(uid: str, code: str, meaning: str) -> str:
    return (
        f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(uid)} "
        'ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">'
        f"<ParticipantObjectIDTypeCode {_code(code, meaning)}/>"
        "</ParticipantObjectIdentification>"
    )


def _text(value: str) -> str:
    return quoteattr(value)[1:-1]


def _is_ip(address: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except OSError:
            continue
        return True
    return False


def syslog_frame(event: AuditEvent, source_id: str, hostname: str) -> bytes:
    """One RFC 5424 message carrying the audit XML, framed by octet counting (RFC 6587 3.4.1,
    the framing RFC 5425 prescribes over TLS)."""
    severity = 5 if event.outcome == "success" else 4
    when = event.at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = (
        f"<{_FACILITY * 8 + severity}>1 {when} {hostname or '-'} {APP_NAME} {os.getpid()} "
        f"{MSG_ID} - "
    )
    # The message is UTF-8, marked with the BOM as RFC 5424 6.4 asks.
    message = header.encode("ascii") + b"\xef\xbb\xbf" + audit_xml(event, source_id).encode()
    return str(len(message)).encode("ascii") + b" " + message


class AuditTrail:
    """Audit events to one syslog collector, from a thread of their own (see the module doc)."""

    def __init__(
        self,
        host: str,
        port: int,
        source_id: str,
        tls: ssl.SSLContext | None = None,
        queue_size: int = 10_000,
        reconnect_s: float = 2.0,
    ) -> None:
        self.host, self.port, self.source_id, self.tls = host, port, source_id, tls
        self.reconnect_s = reconnect_s
        self.hostname = socket.gethostname()[:255]
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="cxr-audit", daemon=True)
        self._connection: socket.socket | None = None
        self._outage_logged = False
        self._thread.start()

    def record(self, event: AuditEvent) -> None:
        """Queue one event; never blocks (a full queue drops it and counts it)."""
        try:
            self._queue.put_nowait(syslog_frame(event, self.source_id, self.hostname))
        except queue.Full:
            self.dropped += 1

    def record_all(self, events: Iterable[AuditEvent]) -> None:
        for event in events:
            self.record(event)

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for up to `timeout_s`), then stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)
        if self._connection is not None:
            self._connection.close()

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=10.0)
        if self.tls is None:
            return raw
        return self.tls.wrap_socket(raw, server_hostname=self.host)

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            while True:
                try:
                    if self._connection is None:
                        self._connection = self._connect()
                    self._connection.sendall(frame)
                    self.sent += 1
                    if self._outage_logged:
                        logger.warning(
                            "audit collector %s:%d reachable again", self.host, self.port
                        )
                        self._outage_logged = False
                    break
                except OSError as exc:
                    if self._connection is not None:
                        self._connection.close()
                        self._connection = None
                    if not self._outage_logged:
                        logger.error(
                            "audit collector %s:%d unreachable (%s); audit messages are dropped "
                            "until it is back",
                            self.host,
                            self.port,
                            type(exc).__name__,
                        )
                        self._outage_logged = True
                    self.dropped += 1
                    time.sleep(self.reconnect_s)
                    break
