"""A result the archive already holds: Orthanc's default (keep the first copy, answer success), an
archive that answers 409 or FailureReason 0x0111 (as Google's does) with the copy it holds served
over WADO-RS, by a small server on 127.0.0.1 and by a real Orthanc behind it, and a C-STORE peer
that answers 0x0111."""

from __future__ import annotations

import datetime
import http.server
import io
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from app.pacs.delivery import (
    DUPLICATE_SOP_INSTANCE,
    DeliveryWorker,
    DimseDestination,
    StowRsDestination,
    same_result,
)
from app.pacs.objects import encode
from app.pacs.outbox import Outbox, ResultObject
from app.pacs.stow import iter_parts, parse_content_type
from tests.app.pacs.pacs_results import (
    as_deliveries,
    enqueue_answer,
    factory_source,
    highdicom_clock_at,
    make_facts,
    result_objects,
)
from tests.app.pacs.pacs_servers import ORTHANC_AET, Orthanc, free_port

ANOTHER_DAY = datetime.datetime(2031, 7, 4, 23, 59, 58, 123456)
T0 = 1_800_000_000.0
_INSTANCE_PATH = re.compile(r"/dicom-web/studies/[0-9.]+/series/[0-9.]+/instances/([0-9.]+)")


def rendered_on_another_day(source: Dataset, probability: float = 0.8731) -> list[ResultObject]:
    with highdicom_clock_at(ANOTHER_DAY):
        return result_objects(source, make_facts(probability=probability))


def _element(vr: str, value: object) -> dict[str, object]:
    return {"vr": vr, "Value": [value]}


@dataclass
class Archive:
    """What the archive on 127.0.0.1 holds and does: instances by SOP Instance UID; the
    FailureReason it gives a second copy (None: none); the status it answers a retrieve with
    instead of the copy; or an upstream DICOMweb base (a real Orthanc) it retrieves from."""

    held: dict[str, bytes] = field(default_factory=dict)
    duplicate_reason: int | None = DUPLICATE_SOP_INSTANCE
    refuse_all: int | None = None
    retrieve_status: int | None = None
    upstream: str | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    server: ArchiveServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """STOW-RS: a new instance is stored; a held one, or any under `refuse_all`, fails."""
        archive = self.server.archive
        archive.requests.append(("POST", self.path, self.headers.get("Authorization")))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        referenced, failed = [], []
        for part in iter_parts(body, parse_content_type(self.headers["Content-Type"])):
            ds = pydicom.dcmread(io.BytesIO(part.data), stop_before_pixels=True)
            item = {
                "00081150": _element("UI", ds.SOPClassUID),
                "00081155": _element("UI", ds.SOPInstanceUID),
            }
            if archive.refuse_all is not None:
                failed.append({**item, "00081197": _element("US", archive.refuse_all)})
            elif ds.SOPInstanceUID in archive.held:
                reason = archive.duplicate_reason
                failed.append({**item, **({"00081197": _element("US", reason)} if reason else {})})
            else:
                archive.held[ds.SOPInstanceUID] = part.data
                referenced.append(item)
        answer = {
            **({"00081199": {"vr": "SQ", "Value": referenced}} if referenced else {}),
            **({"00081198": {"vr": "SQ", "Value": failed}} if failed else {}),
        }
        status = 409 if not referenced else (202 if failed else 200)
        self._answer(status, json.dumps(answer).encode(), "application/dicom+json")

    def do_GET(self) -> None:
        """WADO-RS retrieve of one instance, as multipart/related."""
        archive = self.server.archive
        archive.requests.append(("GET", self.path, self.headers.get("Authorization")))
        match = _INSTANCE_PATH.fullmatch(self.path)
        if archive.retrieve_status is not None or match is None:
            self._answer(archive.retrieve_status or 404, b"")
            return
        if archive.upstream is not None:
            upstream = httpx.get(
                archive.upstream + self.path.removeprefix("/dicom-web"),
                headers={"Accept": self.headers["Accept"]},
                timeout=30.0,
            )
            self._answer(
                upstream.status_code, upstream.content, upstream.headers.get("Content-Type")
            )
            return
        held = archive.held.get(match.group(1))
        if held is None:
            self._answer(404, b"")
            return
        boundary = uuid.uuid4().hex
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + held
            + f"\r\n--{boundary}--\r\n".encode()
        )
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        self._answer(200, body, content_type)


class ArchiveServer(http.server.ThreadingHTTPServer):
    def __init__(self, archive: Archive) -> None:
        super().__init__(("127.0.0.1", 0), ArchiveHandler)
        self.archive = archive

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


@pytest.fixture
def archive() -> Iterator[ArchiveServer]:
    server = ArchiveServer(Archive())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)


def _hold(server: ArchiveServer, objects: list[ResultObject]) -> None:
    server.archive.held.update({o.sop_instance_uid: o.payload for o in objects})


def _summaries(outcomes: list[object]) -> list[tuple[str, str]]:
    return [(o.verdict, o.summary) for o in outcomes]  # type: ignore[attr-defined]


# -- an archive that refuses a second copy: 409 and the copy it holds over WADO-RS --------------


def test_a_re_rendered_result_refused_as_a_duplicate_is_delivered(archive: ArchiveServer) -> None:
    """The archive holds what another pod rendered on another day; the re-send gets 409 with
    FailureReason 0x0111, and the copies retrieved are the same bytes: delivered."""
    source = factory_source(index=40)
    _hold(archive, rendered_on_another_day(source))
    objects = result_objects(source, make_facts())
    assert [archive.archive.held[o.sop_instance_uid] for o in objects] == [
        o.payload for o in objects
    ]
    destination = StowRsDestination(archive.dicomweb, auth_header="Bearer t0ken")
    outcomes = destination.send(as_deliveries(objects, destination.name))
    same = "http 409 failure reason 0x0111: archive holds the same result"
    assert _summaries(outcomes) == [("stored", same)] * 2
    gets = [r for r in archive.archive.requests if r[0] == "GET"]
    assert [(path.rsplit("/", 1)[1], auth) for _, path, auth in gets] == [
        (o.sop_instance_uid, "Bearer t0ken") for o in objects
    ]


def test_a_409_without_a_failure_reason_is_compared_too(archive: ArchiveServer) -> None:
    archive.archive.duplicate_reason = None
    source = factory_source(index=41)
    objects = result_objects(source, make_facts())
    _hold(archive, objects)
    outcomes = StowRsDestination(archive.dicomweb).send(as_deliveries(objects, "stow"))
    assert (
        _summaries(outcomes)
        == [("stored", "http 409 failure reason none: archive holds the same result")] * 2
    )


def test_another_finding_under_the_same_uids_fails_with_the_reason_kept(
    archive: ArchiveServer, tmp_path: Path
) -> None:
    """Same image, model and profile, so the same UIDs, but another probability (as another
    execution provider might compute): not the same result, and the outbox says why."""
    source = factory_source(index=42)
    _hold(archive, rendered_on_another_day(source, probability=0.8712))
    box = Outbox.open(tmp_path)
    try:
        objects = enqueue_answer(box, source, make_facts(), ["stow"], now=T0)
        destination = StowRsDestination(archive.dicomweb, name="stow")
        worker = DeliveryWorker(box, [destination], clock=lambda: T0 + 1.0)
        assert worker.run_once() == 2
        stored = box.result(objects[0].sop_instance_uid)
        assert stored is not None
        assert [(d.kind, d.state, d.last_error) for d in stored.deliveries] == [
            ("sc", "failed", "http 409 failure reason 0x0111: archive copy pixel data differ"),
            ("sr", "failed", "http 409 failure reason 0x0111: archive copy content items differ"),
        ]
        assert worker.counts == {"failed": 2}
    finally:
        box.close()


def test_the_worker_marks_a_duplicate_of_the_same_result_delivered(
    archive: ArchiveServer, tmp_path: Path
) -> None:
    source = factory_source(index=43)
    _hold(archive, rendered_on_another_day(source))
    box = Outbox.open(tmp_path)
    try:
        objects = enqueue_answer(box, source, make_facts(), ["stow"], now=T0)
        destination = StowRsDestination(archive.dicomweb, name="stow")
        worker = DeliveryWorker(box, [destination], clock=lambda: T0 + 1.0)
        assert worker.run_once() == 2
        stored = box.result(objects[0].sop_instance_uid)
        assert stored is not None
        assert [(d.kind, d.state) for d in stored.deliveries] == [
            ("sc", "delivered"),
            ("sr", "delivered"),
        ]
        assert worker.counts == {"delivered": 2}
    finally:
        box.close()


def test_a_409_for_an_instance_the_archive_does_not_hold_fails(archive: ArchiveServer) -> None:
    archive.archive.refuse_all = 0x0122
    objects = result_objects(factory_source(index=44), make_facts())
    outcomes = StowRsDestination(archive.dicomweb).send(as_deliveries(objects, "stow"))
    assert (
        _summaries(outcomes)
        == [("failed", "http 409 failure reason 0x0122: retrieve http 404")] * 2
    )


def test_a_duplicate_beside_a_stored_instance_is_compared_alone(archive: ArchiveServer) -> None:
    """202: the SC is new and stored, the SR is held already (0x0111) and is the same."""
    source = factory_source(index=45)
    objects = result_objects(source, make_facts())
    _hold(archive, objects[:1])
    outcomes = StowRsDestination(archive.dicomweb).send(as_deliveries(objects, "stow"))
    assert _summaries(outcomes) == [
        ("stored", "http 202 failure reason 0x0111: archive holds the same result"),
        ("stored", "http 202"),
    ]
    assert [r[0] for r in archive.archive.requests] == ["POST", "GET"]


def test_a_retrieve_that_meets_a_busy_archive_is_retried(archive: ArchiveServer) -> None:
    objects = result_objects(factory_source(index=46), make_facts())
    _hold(archive, objects)
    archive.archive.retrieve_status = 503
    outcomes = StowRsDestination(archive.dicomweb).send(as_deliveries(objects, "stow"))
    assert (
        _summaries(outcomes) == [("retry", "http 409 failure reason 0x0111: retrieve http 503")] * 2
    )
    archive.archive.retrieve_status = 403
    outcomes = StowRsDestination(archive.dicomweb).send(as_deliveries(objects, "stow"))
    assert {o.verdict for o in outcomes} == {"failed"}


# -- what counts as the same result ---------------------------------------------------------------


def _rewritten(payload: bytes, **changes: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(payload))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return encode(ds)


def test_same_result_compares_content_items_and_pixels_not_dates_or_file_meta() -> None:
    sr, sc = result_objects(factory_source(index=47), make_facts())
    assert same_result(sr.payload, sr.payload) is None
    # a rendering from before the dates came from the source, and an archive's coercions
    earlier = _rewritten(
        sr.payload, ContentDate="20260512", ContentTime="093015.123456", PatientID="CORRECTED"
    )
    assert earlier != sr.payload and same_result(sr.payload, earlier) is None
    other = result_objects(factory_source(index=47), make_facts(probability=0.2))
    assert other[0].sop_instance_uid == sr.sop_instance_uid
    assert same_result(sr.payload, other[0].payload) == "archive copy content items differ"
    assert same_result(sc.payload, other[1].payload) == "archive copy pixel data differ"
    assert same_result(sr.payload, sc.payload) == "archive copy has other uids"
    assert same_result(sr.payload, b"not DICOM") == "archive copy unreadable"


def test_same_result_decodes_pixels_the_archive_sent_in_another_syntax() -> None:
    sc = result_objects(factory_source(index=48), make_facts())[1]
    ds = pydicom.dcmread(io.BytesIO(sc.payload))
    ds.compress(RLELossless, generate_instance_uid=False)
    compressed = encode(ds)
    assert pydicom.dcmread(io.BytesIO(compressed)).PixelData != ds.pixel_array.tobytes()
    assert same_result(sc.payload, compressed) is None


# -- DIMSE: a peer that answers 0x0111 -----------------------------------------------------------


@pytest.fixture
def duplicate_refusing_scp() -> Iterator[int]:
    """A pynetdicom storage SCP on loopback that answers every C-STORE with 0x0111."""
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom import events as evts

    ae = AE(ae_title="STRICT_PACS")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evts.EVT_C_STORE, lambda event: DUPLICATE_SOP_INSTANCE)],
    )
    try:
        yield port
    finally:
        server.shutdown()


def test_dimse_duplicate_is_delivered_and_says_it_was_not_compared(
    duplicate_refusing_scp: int,
) -> None:
    destination = DimseDestination.parse(f"STRICT_PACS@127.0.0.1:{duplicate_refusing_scp}")
    objects = result_objects(factory_source(index=49), make_facts())
    outcomes = destination.send(as_deliveries(objects, destination.name))
    assert (
        _summaries(outcomes)
        == [("stored", "dimse status 0x0111 duplicate - archive copy not compared")] * 2
    )


# -- a real Orthanc ----------------------------------------------------------------------------


def test_orthanc_keeps_the_first_copy_and_answers_success(orthanc: Orthanc) -> None:
    """Orthanc's default (OverwriteInstances false): a second copy under the same UID is answered
    200 over STOW-RS and 0x0000 over C-STORE, and the first is kept; the re-rendered result is that
    first copy byte for byte."""
    source = factory_source(index=50)
    first = rendered_on_another_day(source)
    stow = StowRsDestination(orthanc.dicomweb)
    assert {o.verdict for o in stow.send(as_deliveries(first, "stow"))} == {"stored"}
    again = result_objects(source, make_facts())
    assert _summaries(stow.send(as_deliveries(again, "stow"))) == [("stored", "http 200")] * 2
    for obj in again:
        assert orthanc.file(orthanc.find_instance(obj.sop_instance_uid)[0]) == obj.payload
    # another finding under the same UID: success again, and the first copy stays
    changed = result_objects(source, make_facts(probability=0.2))
    dimse = DimseDestination.parse(f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}")
    assert {o.summary for o in dimse.send(as_deliveries(changed, dimse.name))} == {
        "dimse status 0x0000"
    }
    assert {o.verdict for o in stow.send(as_deliveries(changed, "stow"))} == {"stored"}
    for obj in first:
        assert orthanc.file(orthanc.find_instance(obj.sop_instance_uid)[0]) == obj.payload


def test_409_compared_with_the_copy_a_real_orthanc_serves(
    orthanc: Orthanc, archive: ArchiveServer
) -> None:
    """An archive that answers 409 to every store and retrieves from Orthanc's WADO-RS: the same
    result there is delivered, another finding under the same UIDs is failed."""
    archive.archive.refuse_all = DUPLICATE_SOP_INSTANCE
    archive.archive.upstream = orthanc.dicomweb
    destination = StowRsDestination(archive.dicomweb)
    same_source, other_source = factory_source(index=51), factory_source(index=52)
    StowRsDestination(orthanc.dicomweb).send(
        as_deliveries(rendered_on_another_day(same_source), "stow")
        + as_deliveries(rendered_on_another_day(other_source, probability=0.2), "stow")
    )
    outcomes = destination.send(as_deliveries(result_objects(same_source, make_facts()), "stow"))
    assert (
        _summaries(outcomes)
        == [("stored", "http 409 failure reason 0x0111: archive holds the same result")] * 2
    )
    outcomes = destination.send(as_deliveries(result_objects(other_source, make_facts()), "stow"))
    assert _summaries(outcomes) == [
        ("failed", "http 409 failure reason 0x0111: archive copy content items differ"),
        ("failed", "http 409 failure reason 0x0111: archive copy pixel data differ"),
    ]
    missing = result_objects(factory_source(index=53), make_facts())
    outcomes = destination.send(as_deliveries(missing, "stow"))
    assert {o.summary for o in outcomes} == {"http 409 failure reason 0x0111: retrieve http 404"}
