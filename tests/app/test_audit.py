"""The audit trail against Debian's rsyslog on loopback: RFC 5424 over TCP with octet counting,
each message a DICOM audit message (PS3.15 A.5) that parses and names the event."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.audit import AuditEvent, AuditTrail, Participant, audit_xml, syslog_frame
from tests.support.syslog_peer import HEADER, free_port, received, rsyslog_collector


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with rsyslog_collector(tmp_path) as peer:
        yield peer


EVENTS = [
    AuditEvent(
        "instances_received",
        participants=(Participant("MODALITY1", True, "127.0.0.1", ("110153", "Source Role ID")),),
        study_uids=("1.2.3.4",),
        sop_instance_uids=("1.2.3.4.5",),
    ),
    AuditEvent(
        "results_exported",
        participants=(Participant("CXR_AI", True), Participant("ORTHANC", False, "127.0.0.1")),
        study_uids=("1.2.3.4",),
        sop_instance_uids=("1.2.3.4.9",),
    ),
    AuditEvent(
        "results_read",
        participants=(Participant("key:viewer01", True, "10.0.0.7"),),
        sop_instance_uids=("1.2.3.4.5",),
    ),
    AuditEvent(
        "authentication_failed",
        outcome="minor_failure",
        participants=(Participant("unknown key", True, "10.0.0.8"),),
    ),
]


def test_rsyslog_receives_parseable_rfc5424_dicom_audit_messages(
    rsyslog: tuple[int, Path],
) -> None:
    port, out = rsyslog
    trail = AuditTrail("127.0.0.1", port, source_id="CXR_AI@test")
    trail.record_all(EVENTS)
    trail.close()
    lines = received(out, len(EVENTS))
    assert trail.sent == len(EVENTS) and trail.dropped == 0
    seen = []
    for line in lines:
        match = HEADER.match(line)
        assert match, line
        pri, _, _, app, _, msgid, _, message = match.groups()
        assert (app, msgid) == ("cxr-ai", "IHE+DICOM")
        root = ET.fromstring(message.lstrip("\ufeff"))
        event_id = root.find("EventIdentification/EventID")
        assert event_id is not None
        seen.append((event_id.get("csd-code"), int(pri) % 8, root))
    assert [code for code, _, _ in seen] == ["110104", "110106", "110103", "110114"]
    assert [severity for _, severity, _ in seen] == [5, 5, 5, 4]
    first = seen[0][2]
    objects = first.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objects] == ["1.2.3.4", "1.2.3.4.5"]
    failure = seen[3][2].find("EventIdentification")
    assert failure is not None and failure.get("EventOutcomeIndicator") == "4"


def test_a_missing_collector_drops_and_counts_and_never_blocks() -> None:
    port = free_port()  # nothing listens
    trail = AuditTrail("127.0.0.1", port, source_id="x", queue_size=2, reconnect_s=0.05)
    started = time.monotonic()
    for _ in range(50):
        trail.record(EVENTS[0])
    assert time.monotonic() - started < 0.5
    trail.close(timeout_s=2)
    assert trail.sent == 0 and trail.dropped >= 48


def test_the_message_is_octet_counted_and_carries_no_more_than_it_is_given() -> None:
    frame = syslog_frame(EVENTS[2], "src", "host")
    length, _, message = frame.partition(b" ")
    assert int(length) == len(message)
    xml = audit_xml(EVENTS[2], "src")
    assert 'UserID="key:viewer01"' in xml and "1.2.3.4.5" in xml
    hostile = AuditEvent("security_alert", detail='<x>"&', participants=(Participant('a"b', True),))
    ET.fromstring(audit_xml(hostile, "src"))  # escaped: still well-formed
