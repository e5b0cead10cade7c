"""The result as an HL7 v2.5.1 ORU^R01, and its delivery over MLLP to a RIS.

`render_oru` writes one message per result (layout and every field in docs/CONFORMANCE.md, "HL7
v2.5.1 ORU^R01"): PID from the source's patient module, ORC/OBR with the order numbers, the
procedure, the preliminary status and the observation time, TQ1 (or the older ORC-7/OBR-27) with
the worklist priority a positive answer asks for, OBX for the finding (coded, with an abnormal
flag), the probability, the threshold, the model's name, version and sha256, the study instance UID
and each warning, and the research-use disclaimer as an NTE. MSH-10, the control ID, is derived from
the result: a re-send of the same result carries the same control ID, so a RIS that has seen it can
tell.

`MllpDestination` sends the stored messages over one TCP connection, kept open and reused, framed
as MLLP (<VT> message <FS><CR>), and waits for the original-mode ACK: AA (or CA) is delivered, AE
(CE) is retried with the worker's backoff, AR (CR) is final with the receiver's reason kept in the
outbox. No ACK within the timeout, an ACK for another control ID, a refused or broken connection:
the connection is dropped and the message retried; the next attempt connects anew. Outcome summaries
carry the acknowledgment code and the receiver's error code only; its free text (which might name
the patient) goes to the outbox's error column, never to the log.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import select
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.pacs.delivery import Outcome
from app.pacs.objects import ResultFacts
from app.pacs.outbox import Delivery, ResultObject
from app.pacs.ris import (
    ABSENT,
    ALGORITHM_NAME,
    ALGORITHM_PARAMETERS,
    ALGORITHM_VERSION,
    HL7_KIND,
    HL7_MEDIA_TYPE,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    STUDY_INSTANCE_UID,
    THRESHOLD,
    OrderFacts,
    message_uid,
)
from app.pacs.uids import device_uid

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
HL7_VERSION = "2.5.1"
# HL7 table 0485 (extended priority codes): stat, ASAP, routine, pre-op, callback, timing critical
PRIORITY_CODES = {"S": "Stat", "A": "ASAP", "R": "Routine", "P": "Preop", "C": "Callback", "T": ""}
PRIORITY_FIELDS = ("TQ1-9", "OBR-27", "ORC-7")
ORDER_NUMBER_FIELDS = ("placer", "filler", "obr18")
# A local code system (HL7 reserves "99" prefixes for them) for the service's own OBX
WARNING = ("CXR-WARNING", "Service warning", "99CXR")
_MAX_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Hl7Profile:
    """How a site wants the message: who sends it to whom, where the accession number goes, and
    which priority field (and code) a positive answer sets."""

    sending_application: str = "CXR_AI"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    # "placer" (ORC-2/OBR-2), "filler" (ORC-3/OBR-3), "obr18" (OBR-18, IHE Scheduled Workflow):
    # where the accession number goes when the image carries no order number of that kind
    accession_in: tuple[str, ...] = ("filler", "obr18")
    priority_fields: tuple[str, ...] = ("TQ1-9",)
    positive_priority: str = "A"
    # empty: a negative answer leaves the order's own priority as it is
    negative_priority: str = ""


def escape(text: str) -> str:
    """A text value with HL7's delimiters escaped (`\\E\\` first) and line breaks as spaces."""
    for raw, escaped in (
        ("\\", "\\E\\"),
        ("|", "\\F\\"),
        ("^", "\\S\\"),
        ("&", "\\T\\"),
        ("~", "\\R\\"),
    ):
        text = text.replace(raw, escaped)
    return " ".join(text.split())


def control_id(uid: str) -> str:
    """MSH-10 of the message with UID `uid`: 20 characters (the field's length in v2.5.1)."""
    return "CXR" + hashlib.sha256(uid.encode("ascii")).hexdigest()[:17].upper()


def _ts(date: str, time: str = "", offset: str = "") -> str:
    """A TS/DTM value: the time's fraction cut to the 4 digits v2.5.1 allows."""
    if "." in time:
        whole, fraction = time.split(".", 1)
        time = f"{whole}.{fraction[:4]}" if fraction[:4] else whole
    return date + time + (offset if re.fullmatch(r"[+-][0-9]{4}", offset) else "")


def _coded(code: tuple[str, str, str]) -> str:
    return "^".join(escape(part) for part in code)


def _segment(name: str, *fields: str) -> str:
    values = list(fields)
    while values and not values[-1]:
        values.pop()
    return "|".join((name, *values))


def _field(fields: list[str], number: int, value: str) -> None:
    """Set field `number` (1-based, as the standard counts) of a segment's field list."""
    while len(fields) < number:
        fields.append("")
    fields[number - 1] = value


def render_oru(
    source: OrderFacts,
    facts: ResultFacts,
    result_key: str,
    profile: Hl7Profile,
    *,
    warnings: Sequence[str] = (),
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> ResultObject:
    """The ORU^R01 of one result, as an outbox object of kind `hl7-oru` (ER7, UTF-8)."""
    uid = message_uid(result_key, HL7_KIND)
    now = clock().astimezone(datetime.UTC).strftime("%Y%m%d%H%M%S+0000")
    observed = _ts(source.observed.date, source.observed.time, source.timezone_offset)
    priority = profile.positive_priority if facts.positive else profile.negative_priority
    priority_cwe = f"{priority}^{PRIORITY_CODES.get(priority, '')}^HL70485" if priority else ""
    priority_tq = f"^^^^^{priority}" if priority else ""

    accession = escape(source.accession_number)
    placer = escape(source.placer_order_number) or (
        accession if "placer" in profile.accession_in else ""
    )
    filler = escape(source.filler_order_number) or (
        accession if "filler" in profile.accession_in else ""
    )
    name = source.patient_name
    xpn = "^".join(
        escape(part) for part in (name.family, name.given, name.middle, name.suffix, name.prefix)
    ).rstrip("^")
    patient_id = escape(source.patient_id)
    if patient_id and source.issuer_of_patient_id:
        patient_id += f"^^^{escape(source.issuer_of_patient_id)}"
    sex = source.sex if source.sex in ("M", "F", "O") else ("U" if source.sex else "")
    procedure = (
        f"{escape(source.procedure.code)}^{escape(source.procedure.meaning)}"
        f"^{escape(source.procedure.scheme)}"
    )

    segments = [
        _segment(
            "MSH",
            "^~\\&",
            escape(profile.sending_application),
            escape(profile.sending_facility),
            escape(profile.receiving_application),
            escape(profile.receiving_facility),
            now,
            "",
            "ORU^R01^ORU_R01",
            control_id(uid),
            "P",
            HL7_VERSION,
            "",
            "",
            "",
            "",
            "",
            "UNICODE UTF-8",
        ),
        _segment("PID", "1", "", patient_id, "", xpn, "", source.birth_date, sex),
    ]
    orc = ["RE", placer, filler, "", "", "", "", "", now]
    if "ORC-7" in profile.priority_fields:
        _field(orc, 7, priority_tq)
    segments.append(_segment("ORC", *orc))
    obr = ["1", placer, filler, procedure, "", "", observed]
    if "obr18" in profile.accession_in:
        _field(obr, 18, accession)
    _field(obr, 22, now)
    _field(obr, 24, "RAD")
    _field(obr, 25, "P")
    if "OBR-27" in profile.priority_fields:
        _field(obr, 27, priority_tq)
    segments.append(_segment("OBR", *obr))
    segments.append(_segment("NTE", "1", "L", escape(facts.disclaimer)))
    if "TQ1-9" in profile.priority_fields and priority_cwe:
        segments.append(_segment("TQ1", "1", "", "", "", "", "", "", "", priority_cwe))

    algorithm = f"{escape(facts.model_name)}^^{device_uid(facts.model_sha256)}^ISO"
    parameters = f"onnx sha256={facts.model_sha256}" + (
        f" site profile sha256={facts.site_profile_sha256}" if facts.site_profile_sha256 else ""
    )
    observations: list[tuple[str, tuple[str, str, str], str, str, str]] = [
        # value type, code, value, units, abnormal flag
        ("CWE", PNEUMONIA, _coded(PRESENT if facts.positive else ABSENT), "", ""),
        ("NM", PROBABILITY, f"{facts.positive_probability:.6f}", "1^^UCUM", ""),
        ("NM", THRESHOLD, f"{facts.threshold:.6f}", "1^^UCUM", ""),
        ("ST", ALGORITHM_NAME, escape(facts.model_name), "", ""),
        ("ST", ALGORITHM_VERSION, escape(facts.model_version), "", ""),
        ("ST", ALGORITHM_PARAMETERS, escape(parameters), "", ""),
    ]
    if source.study_instance_uid:
        observations.append(
            ("HD", STUDY_INSTANCE_UID, f"^{escape(source.study_instance_uid)}^ISO", "", "")
        )
    for index, warning in enumerate(warnings, start=1):
        observations.append(("ST", WARNING, escape(warning), "", str(index)))
    for set_id, (value_type, code, value, units, sub_id) in enumerate(observations, start=1):
        obx = [str(set_id), value_type, _coded(code), sub_id, value, units]
        if set_id == 1:
            _field(obx, 8, "A" if facts.positive else "N")
            _field(obx, 18, algorithm)
        _field(obx, 11, "P")
        _field(obx, 14, observed)
        segments.append(_segment("OBX", *obx))
    message = "\r".join(segments) + "\r"
    return ResultObject(HL7_KIND, HL7_MEDIA_TYPE, uid, message.encode("utf-8"))


@dataclass(frozen=True)
class Ack:
    """The parts of an ACK that decide a delivery."""

    code: str
    control_id: str
    error_code: str
    text: str


def _fields(segment: str, separator: str) -> list[str]:
    """A segment's fields indexed as the standard counts them (MSH-1 is the separator)."""
    parts = segment.split(separator)
    if parts[0] == "MSH":
        return ["MSH", separator, *parts[1:]]
    return parts


def parse_ack(block: bytes) -> Ack | None:
    """MSA-1, MSA-2, the error code (ERR-3, else MSA-6) and text (ERR-8, else MSA-3), or None
    for a block that is not an HL7 message with an MSA segment."""
    text = block.decode("utf-8", errors="replace")
    segments = [s for s in re.split(r"\r\n|\r|\n", text) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return None
    separator, component = segments[0][3], segments[0][4]
    parsed = [_fields(s, separator) for s in segments]
    msa = next((f for f in parsed if f[0] == "MSA"), None)
    if msa is None or len(msa) < 3:
        return None
    err = next((f for f in parsed if f[0] == "ERR"), [])

    def at(fields: list[str], number: int) -> str:
        return fields[number] if len(fields) > number else ""

    error_code = at(err, 3).split(component)[0] or at(msa, 6).split(component)[0]
    reason = at(err, 8) or at(msa, 3)
    return Ack(at(msa, 1).strip().upper(), at(msa, 2).strip(), error_code.strip(), reason.strip())


def message_control_id(payload: bytes) -> str:
    """MSH-10 of a stored message."""
    first = payload.split(b"\r", 1)[0].decode("utf-8", errors="replace")
    fields = _fields(first, first[3] if len(first) > 3 else "|")
    return fields[10] if len(fields) > 10 else ""


class MllpError(Exception):
    """The peer broke MLLP framing or the connection."""


class MllpDestination:
    """A RIS (or an interface engine) that takes ORU^R01 over MLLP at `host:port`.

    One connection, opened on first use and kept for the following messages; a connection the peer
    closed while idle is noticed before the next message and opened anew. Messages are sent one at
    a time, each waiting for its ACK (`ack_timeout_s`). Used by the delivery worker's one thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        name: str | None = None,
        connect_timeout_s: float = 5.0,
        ack_timeout_s: float = 30.0,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError("the port must be 1-65535")
        self.host = host
        self.port = port
        self.name = name or f"mllp:{host}:{port}"
        self.connect_timeout_s = connect_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self._socket: socket.socket | None = None
        self.connections_opened = 0

    @classmethod
    def parse(cls, spec: str, **options: float | str) -> MllpDestination:
        """`mllp://host:port` or `host:port` (an IPv6 host in brackets)."""
        match = re.fullmatch(r"(?:mllp://)?([^:/@\s\[\]]+|\[[0-9a-fA-F:]+\]):([0-9]{1,5})/?", spec)
        if match is None:
            raise ValueError("an MLLP destination is written mllp://host:port or host:port")
        return cls(match.group(1).strip("[]"), int(match.group(2)), **options)  # type: ignore[arg-type]

    def send(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for delivery in deliveries:
            outcome = self._send_one(delivery)
            outcomes.append(outcome)
            if outcome.verdict == "retry" and self._socket is None:
                # the peer is unreachable or broke the connection: the rest waits for the backoff
                # instead of each paying a connect or ACK timeout now
                rest = len(deliveries) - len(outcomes)
                outcomes += [Outcome("retry", outcome.summary)] * rest
                break
        return outcomes

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

    def _connection(self) -> socket.socket:
        if self._socket is not None and not _idle_and_open(self._socket):
            self.close()
        if self._socket is None:
            self._socket = socket.create_connection(
                (self.host, self.port), timeout=self.connect_timeout_s
            )
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections_opened += 1
        self._socket.settimeout(self.ack_timeout_s)
        return self._socket

    def _send_one(self, delivery: Delivery) -> Outcome:
        expected = message_control_id(delivery.payload)
        try:
            connection = self._connection()
            connection.sendall(START_BLOCK + delivery.payload + END_BLOCK)
            block = _read_block(connection)
        except (OSError, MllpError) as error:
            self.close()
            return Outcome("retry", f"mllp {type(error).__name__}")
        ack = parse_ack(block)
        if ack is None:
            self.close()
            return Outcome("retry", "mllp answer is not an ack")
        if ack.control_id != expected:
            # an ACK of an earlier message (a peer that answered late): this one is unanswered
            self.close()
            return Outcome("retry", "mllp ack for another control id")
        summary = f"hl7 {ack.code}" + (f" error {ack.error_code}" if ack.error_code else "")
        detail = ack.text or None
        if ack.code in ("AA", "CA"):
            return Outcome("stored", summary)
        if ack.code in ("AR", "CR"):
            return Outcome("failed", summary, detail=detail)
        return Outcome("retry", summary, detail=detail)


def _idle_and_open(connection: socket.socket) -> bool:
    """True when an idle connection is still open and has nothing unread (a peer that closed it
    makes it readable with EOF)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _read_block(connection: socket.socket) -> bytes:
    """One MLLP block's content; raises MllpError on EOF, junk before <VT> or an oversized one."""
    buffer = b""
    while END_BLOCK not in buffer:
        chunk = connection.recv(65536)
        if not chunk:
            raise MllpError("connection closed before the ack")
        buffer += chunk
        if len(buffer) > _MAX_BLOCK_BYTES:
            raise MllpError("ack over 1 MiB")
    start = buffer.find(START_BLOCK)
    if start < 0 or buffer[:start].strip():
        raise MllpError("no start block")
    return buffer[start + 1 : buffer.index(END_BLOCK, start)]
