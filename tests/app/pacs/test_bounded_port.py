"""The DICOM port bounded before trust (issue 26, item 2), against the service as a subprocess
on loopback, its memory and threads read from /proc: a PDU declaring 300 MB is aborted before
its body is read (before and after negotiation), three deflate bombs at once have their headers
read without inflating them, ten trickling connections neither hold the association slots nor
outlive the read deadline while a listed peer's C-ECHO is answered, idle connections past the
bound are closed without threads, and a 150 MiB instance of an ignored SOP class is dropped as it
arrives. In process: the per-instance and the listener-wide bounds on data sets held in memory.
Each abort or refusal is logged and counted."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE

from app.pacs.scp import StorageListener
from app.pacs.spool import Spool
from app.testing.server import ServiceProcess, free_port, http_status
from tests.app.pacs.intake_tools import LOOPBACK, chest_gate, unique_uid, wait_until
from tests.support.testkit import process_settings

VERIFICATION = "1.2.840.10008.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MiB = 1024 * 1024
READ_DEADLINE_S = 3.0
MAX_ASSOCIATIONS = 10
MAX_PENDING = 16


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, int]]:
    """The service with its C-STORE listener on 127.0.0.1, this machine listed as its peer."""
    workdir = tmp_path_factory.mktemp("bounded-port")
    dicom_port = free_port()
    settings = process_settings(
        workdir,
        state_dir=str(workdir / "state"),
        dicom_port=str(dicom_port),
        dicom_host=LOOPBACK,
        dicom_peers="*@127.0.0.1",
        dicom_max_associations=str(MAX_ASSOCIATIONS),
        dicom_max_pending_connections=str(MAX_PENDING),
        dicom_read_deadline_s=str(READ_DEADLINE_S),
    )
    with ServiceProcess.serving(workdir / "service.log", settings) as server:
        assert echo(dicom_port), server.log()[-3000:]
        yield server, dicom_port


def echo(port: int) -> bool:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title="CXR_AI")
    try:
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def counter(server: ServiceProcess, outcome: str) -> int:
    """cxr_intake_instances{intake="dimse",outcome=...} from the service's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    pattern = rf'cxr_intake_instances_total\{{intake="dimse",outcome="{outcome}"\}} (\S+)'
    found = re.search(pattern, text)
    return int(float(found.group(1))) if found else 0


def threads(server: ServiceProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def send_declared(sock: socket.socket, pdu_type: int, declared: int, body_bytes: int) -> int:
    """A PDU header declaring `declared` bytes, then up to `body_bytes` zeros until the peer
    stops reading; returns what was sent of the body."""
    sock.sendall(struct.pack(">BBL", pdu_type, 0, declared))
    chunk = bytes(MiB)
    sent = 0
    try:
        while sent < body_bytes:
            sent += sock.send(chunk)
    except OSError:  # the listener aborted and closed: what is meant to happen
        pass
    return sent


def test_a_300_mb_pdu_is_aborted_before_it_is_read(service: tuple[ServiceProcess, int]) -> None:
    server, port = service
    before = counter(server, "aborted_pdu_too_long")
    server.reset_peak_rss()
    baseline = server.rss_mib()
    # Before negotiation: an A-ASSOCIATE-RQ declaring 300 MB.
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        raw.settimeout(10)
        sent = send_declared(raw, 0x01, 300_000_000, 300_000_000)
    # After negotiation: a P-DATA-TF declaring 300 MB on an established association.
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title="CXR_AI")
    assert assoc.is_established
    established_sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert established_sock is not None
    sent_after = send_declared(established_sock, 0x04, 300_000_000, 300_000_000)
    assert wait_until(lambda: not assoc.is_alive(), timeout=10)
    assert assoc.is_aborted
    assert wait_until(lambda: counter(server, "aborted_pdu_too_long") == before + 2, timeout=10)
    growth = server.peak_rss_mib() - baseline
    assert growth < 64, f"peak RSS grew {growth} MiB (sent {sent} and {sent_after} bytes)"
    assert sent < 300_000_000 and sent_after < 300_000_000  # the rest was never read
    log = server.log()
    assert log.count('"pdu_too_long"') >= 2 and '"declared": 300000000' in log
    assert echo(port)  # the port still serves


def large_file(
    path: Path,
    index: int,
    pixel_bytes: int,
    sop_class: str = DX_STORAGE,
    syntax: str = DeflatedExplicitVRLittleEndian,
    body_part: str = "HEAD",
) -> Path:
    """An instance with a readable header (a head by default, so that the intended-use gate sets
    it aside) and `pixel_bytes` of zeros as pixel data, written in chunks; deflated by default
    (250 MiB of zeros deflate to about 250 kB: a deflate bomb)."""
    uid = unique_uid(26, 2, index)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = unique_uid(26, 2, 0)
    ds.SeriesInstanceUID = unique_uid(26, 2, 1000 + index)
    ds.Modality = "DX"
    ds.BodyPartExamined = body_part
    ds.Rows = ds.Columns = 8192
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixels_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    deflated = syntax == DeflatedExplicitVRLittleEndian
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    target = path / f"large{index}.dcm"
    with target.open("wb") as out:
        out.write(head.getvalue())
        first = body.getvalue() + pixels_header
        out.write(deflater.compress(first) if deflated else first)
        left = pixel_bytes
        while left:
            zeros = bytes(min(left, MiB))
            out.write(deflater.compress(zeros) if deflated else zeros)
            left -= len(zeros)
        if deflated:
            out.write(deflater.flush())
    return target


def deflate_bomb(path: Path, index: int, inflated_pixels: int = 250 * MiB) -> Path:
    return large_file(path, index, inflated_pixels)


def store(
    port: int,
    path: Path,
    sop_class: str = DX_STORAGE,
    syntax: str = DeflatedExplicitVRLittleEndian,
) -> int | None:
    """C-STORE of the file at `path` as it is (pynetdicom sends a file's data set undecoded);
    the status, or None when the association was refused or aborted."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(LOOPBACK, port, ae_title="CXR_AI")
    try:
        if not assoc.is_established:
            return None
        status = assoc.send_c_store(path)
        return int(status.Status) if status else None
    finally:
        if assoc.is_established:
            assoc.release()


def test_three_deflate_bombs_at_once_leave_memory_alone(
    service: tuple[ServiceProcess, int], tmp_path: Path
) -> None:
    server, port = service
    bombs = [deflate_bomb(tmp_path, i) for i in range(3)]
    assert all(b.stat().st_size < 400_000 for b in bombs)
    before = counter(server, "ignored_not_intended_use")
    server.reset_peak_rss()
    baseline = server.rss_mib()
    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda b: store(port, b), bombs))
    # Each header was read (a head: set aside as not the intended use, answered success).
    assert statuses == [0x0000] * 3
    assert counter(server, "ignored_not_intended_use") == before + 3
    growth = server.peak_rss_mib() - baseline
    assert growth < 64, f"peak RSS grew {growth} MiB"


def test_ten_trickling_peers_leave_the_port_open_to_a_listed_peer(
    service: tuple[ServiceProcess, int],
) -> None:
    server, port = service
    before = counter(server, "aborted_read_deadline")
    stop = threading.Event()
    headers_sent: list[int] = []
    peers = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(10)]

    def trickle(sock: socket.socket) -> None:
        # An A-ASSOCIATE-RQ that declares 1,000 bytes, then a byte every half second.
        try:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 1000))
            headers_sent.append(1)
            while not stop.wait(0.5):
                sock.sendall(b"\x00")
        except OSError:  # aborted by the listener
            pass

    workers = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in peers]
    for worker in workers:
        worker.start()
    try:
        # Every trickler is connected and has started its PDU before the echo.
        assert wait_until(lambda: len(headers_sent) == 10, timeout=5)
        started = time.monotonic()
        assert echo(port)
        assert time.monotonic() - started < 5
        # The read deadline ends every trickler's PDU: each aborted, logged and counted.
        assert wait_until(
            lambda: counter(server, "aborted_read_deadline") >= before + 10,
            timeout=READ_DEADLINE_S + 10,
        )
        assert server.log().count('"read_deadline"') >= 10
    finally:
        stop.set()
        for sock in peers:
            sock.close()


def test_idle_connections_past_the_bound_are_closed_without_threads(
    service: tuple[ServiceProcess, int],
) -> None:
    server, port = service
    assert wait_until(lambda: threads(server) < 60, timeout=READ_DEADLINE_S + 10)
    idle_threads = threads(server)
    before = counter(server, "refused_too_many_connections")
    held = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(150)]
    try:
        bound = MAX_ASSOCIATIONS + MAX_PENDING
        assert wait_until(
            lambda: counter(server, "refused_too_many_connections") >= before + 150 - bound,
            timeout=10,
        )
        # pynetdicom's two threads per open connection, for the bounded number only.
        assert threads(server) - idle_threads <= 2 * bound + 2
        assert "too_many_connections" in server.log()
    finally:
        for sock in held:
            sock.close()
    # Silent connections end at the read deadline (the ACSE timeout) and free their threads.
    assert wait_until(lambda: threads(server) <= idle_threads + 2, timeout=READ_DEADLINE_S + 10)
    assert http_status(server.port, "/health/ready") == 200


def test_a_150_mib_instance_of_an_ignored_sop_class_is_dropped_as_it_arrives(
    service: tuple[ServiceProcess, int], tmp_path: Path
) -> None:
    server, port = service
    path = large_file(
        tmp_path, 50, 150 * MiB, sop_class=SECONDARY_CAPTURE, syntax=ExplicitVRLittleEndian
    )
    before = counter(server, "ignored_sop_class")
    server.reset_peak_rss()
    baseline = server.rss_mib()
    assert store(port, path, SECONDARY_CAPTURE, ExplicitVRLittleEndian) == 0x0000
    assert counter(server, "ignored_sop_class") == before + 1
    growth = server.peak_rss_mib() - baseline
    assert growth < 64, f"peak RSS grew {growth} MiB"


@pytest.fixture
def small_listener(tmp_path: Path) -> Iterator[StorageListener]:
    """A listener in this process whose data sets in memory may hold 3 MiB all together and
    2 MiB each."""
    scp = StorageListener(
        spool=Spool(tmp_path / "spool", 100, 10**9),
        gate=chest_gate,
        port=0,
        host=LOOPBACK,
        max_instance_bytes=2 * MiB,
        max_buffered_bytes=3 * MiB,
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(drain_seconds=2)


def cr_file(path: Path, index: int, pixel_bytes: int) -> Path:
    return large_file(
        path, index, pixel_bytes, CR_STORAGE, ExplicitVRLittleEndian, body_part="CHEST"
    )


def test_an_instance_over_its_bound_aborts_and_the_budget_is_given_back(
    small_listener: StorageListener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp = small_listener
    with caplog.at_level("WARNING", logger="app.pacs.scp"):
        too_large = cr_file(tmp_path, 61, 3 * MiB)
        assert store(scp.port, too_large, CR_STORAGE, ExplicitVRLittleEndian) is None
        assert wait_until(lambda: scp.stats.aborted_instance_too_large == 1, timeout=5)
    assert any(
        getattr(r, "fields", {}).get("reason") == "instance_too_large" for r in caplog.records
    )
    assert wait_until(lambda: scp.buffer_budget.used == 0, timeout=5)
    small = cr_file(tmp_path, 60, MiB)
    assert store(scp.port, small, CR_STORAGE, ExplicitVRLittleEndian) == 0x0000
    assert scp.stats.spooled == 1
    assert scp.buffer_budget.used == 0


def test_concurrent_senders_cannot_add_up_past_the_listener_wide_budget(
    small_listener: StorageListener, tmp_path: Path
) -> None:
    scp = small_listener
    gate_open = threading.Event()

    def held_gate(ds: Dataset) -> str | None:
        gate_open.wait(10)  # the first instance stays in memory until the test lets it go
        return chest_gate(ds)

    scp.gate = held_gate
    first, second = (cr_file(tmp_path, 70 + i, 1900 * 1024) for i in range(2))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(store, scp.port, first, CR_STORAGE, ExplicitVRLittleEndian)
        assert wait_until(lambda: scp.buffer_budget.used >= 1900 * 1024, timeout=10)
        # 1.9 MiB held; another 1.9 MiB does not fit the 3 MiB: aborted, logged and counted.
        assert store(scp.port, second, CR_STORAGE, ExplicitVRLittleEndian) is None
        assert scp.stats.aborted_buffers_full == 1
        gate_open.set()
        assert pending.result(timeout=20) == 0x0000
    assert scp.stats.spooled == 1
    assert wait_until(lambda: scp.buffer_budget.used == 0, timeout=5)
