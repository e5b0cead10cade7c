"""The C-STORE SCP against DCMTK's echoscu/storescu and raw sockets on 127.0.0.1: negotiation,
every decodable transfer syntax over the wire, the peer list (tests/app/pacs/test_dicom_peers.py
has the rest of it), the SOP-class and intended-use
policy, a full spool, parallel senders, a sender killed mid-transfer, garbage on the port, and
a draining stop."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt

from app.pacs.scp import (
    CR_IMAGE_STORAGE,
    DECODABLE_TRANSFER_SYNTAXES,
    DX_FOR_PRESENTATION,
    StorageListener,
)
from app.pacs.spool import Spool
from app.settings import parse_dicom_peers
from app.testing import dicom_files as factory
from tests.app.pacs.intake_tools import (
    LOOPBACK,
    chest_gate,
    instance,
    require_tool,
    run_tool,
    storescu_config,
    unique_uid,
    wait_until,
    write,
)

SENDER = "SENDER"
CALLED = "CXR_AI"


def make_listener(tmp_path: Path, **options: object) -> StorageListener:
    spool_options = {"max_entries": 1000, "max_bytes": 2 * 10**9}
    spool_options.update(options.pop("spool", {}))  # type: ignore[arg-type]
    spool = Spool(tmp_path / "spool", **spool_options)  # type: ignore[arg-type]
    options.setdefault("peers", parse_dicom_peers(f"{SENDER}@{LOOPBACK},ORTHANC@{LOOPBACK}"))
    return StorageListener(
        spool=spool,
        gate=chest_gate,
        port=0,
        host=LOOPBACK,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[StorageListener]:
    scp = make_listener(tmp_path)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(drain_seconds=5)


@pytest.fixture(scope="module")
def dcmtk() -> None:
    require_tool("storescu")
    require_tool("echoscu")


def echo(port: int, calling: str = SENDER) -> subprocess.CompletedProcess[str]:
    return run_tool(["echoscu", "-aet", calling, "-aec", CALLED, LOOPBACK, str(port)], timeout=30)


def storescu(port: int, *files: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "storescu",
        *extra,
        "-aet",
        SENDER,
        "-aec",
        CALLED,
        LOOPBACK,
        str(port),
        *map(str, files),
    ]


def drain(spool: Spool) -> dict[str, pydicom.Dataset]:
    """Claim every pending entry: SOP Instance UID -> the data set read from the spooled bytes."""
    received = {}
    for _ in range(10_000):
        entry = spool.claim()
        if entry is None:
            break
        received[entry.sop_instance_uid] = pydicom.dcmread(io.BytesIO(entry.read_data()))
        spool.done(entry)
    return received


def test_negotiation_offers_exactly_the_decodable_syntaxes_for_cr_and_dx(tmp_path: Path) -> None:
    contexts = make_listener(tmp_path).supported_contexts()
    for sop_class in (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION):
        assert set(contexts[sop_class]) == set(DECODABLE_TRANSFER_SYNTAXES)
    assert set(DECODABLE_TRANSFER_SYNTAXES) == {str(uid) for uid in factory.SYNTAXES.values()}
    assert "1.2.840.10008.1.1" in contexts  # Verification
    assert factory.CT_STORAGE in contexts  # accepted, then ignored (see the module docstring)


def test_an_empty_allow_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_listener(tmp_path, allowed_calling_aets=set())


def test_c_echo(dcmtk: None, listener: StorageListener) -> None:
    done = echo(listener.port)
    assert done.returncode == 0, done.stderr
    assert listener.stats.echoes == 1


def test_a_calling_ae_not_on_the_list_is_rejected(dcmtk: None, listener: StorageListener) -> None:
    done = echo(listener.port, calling="INTRUDER")
    assert done.returncode != 0
    assert "Association Rejected" in done.stderr
    assert wait_until(lambda: listener.stats.associations_rejected == 1, timeout=5)
    assert listener.stats.echoes == 0 and listener.stats.associations_accepted == 0


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    syntaxes = {name: str(uid) for name, uid in factory.SYNTAXES.items()}
    return storescu_config(tmp_path_factory.mktemp("dcmtk") / "storescu.cfg", syntaxes)


@pytest.mark.parametrize("syntax", list(factory.SYNTAXES))
def test_each_decodable_transfer_syntax_arrives_as_sent(
    dcmtk: None, listener: StorageListener, profiles: Path, tmp_path: Path, syntax: str
) -> None:
    uid = unique_uid(10, list(factory.SYNTAXES).index(syntax))
    sent_bytes = instance(syntax, sop_instance_uid=uid)
    path = write(tmp_path, f"{syntax}.dcm", sent_bytes)
    # the profile proposes only the file's own syntax: storescu cannot convert on the way
    done = run_tool(storescu(listener.port, path, extra=("-xf", str(profiles), syntax.upper())))
    assert done.returncode == 0, done.stderr
    entry = listener.spool.claim()
    assert entry is not None and entry.sop_instance_uid == uid
    assert entry.meta["transfer_syntax"] == str(factory.SYNTAXES[syntax])
    assert entry.meta["calling_ae"] == SENDER and entry.meta["source"] == "dimse"
    received = pydicom.dcmread(io.BytesIO(entry.read_data()))
    sent = pydicom.dcmread(io.BytesIO(sent_bytes))
    assert received.file_meta.TransferSyntaxUID == factory.SYNTAXES[syntax]
    assert received.file_meta.MediaStorageSOPInstanceUID == uid
    if syntax != "deflated":  # pydicom inflates the deflated one on reading: compare pixels
        assert received.PixelData == sent.PixelData
    else:
        assert np.array_equal(received.pixel_array, sent.pixel_array)
    assert stat_mode(entry.path) == 0o600


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_other_sop_classes_and_not_intended_use_succeed_but_are_not_spooled(
    dcmtk: None, listener: StorageListener, tmp_path: Path
) -> None:
    ct = write(tmp_path, "ct.dcm", instance(
        "explicit_le", sop_instance_uid=unique_uid(11, 1), modality="CT",
        sop_class=factory.CT_STORAGE,
    ))  # fmt: skip
    lateral = write(
        tmp_path, "lat.dcm", instance("explicit_le", sop_instance_uid=unique_uid(11, 2), view="LL")
    )
    knee = write(
        tmp_path,
        "knee.dcm",
        instance("jpeg_ls", sop_instance_uid=unique_uid(11, 3), body_part="KNEE"),
    )
    done = run_tool(storescu(listener.port, ct, lateral, knee, extra=("-xt",)))
    assert done.returncode == 0, done.stderr  # 0x0000 for each of them
    assert len(listener.spool) == 0
    stats = listener.stats.snapshot()
    assert stats["ignored_sop_class"] == 1
    assert stats["ignored_not_intended_use"] == 2
    assert stats["spooled"] == 0


def test_a_full_spool_answers_out_of_resources(dcmtk: None, tmp_path: Path) -> None:
    scp = make_listener(tmp_path, spool={"max_entries": 1})
    scp.start()
    try:
        files = [
            write(tmp_path, f"{n}.dcm", instance(sop_instance_uid=unique_uid(12, n)))
            for n in range(2)
        ]
        done = run_tool(storescu(scp.port, *files, extra=("-v",)))
        assert done.returncode != 0
        assert "Received Store Response (Refused: OutOfResources)" in done.stderr
        assert scp.stats.refused_spool_full == 1 and scp.stats.spooled == 1
        assert len(scp.spool) == 1
    finally:
        scp.stop(drain_seconds=5)


def test_eight_parallel_senders_of_twenty_images_lose_nothing(
    dcmtk: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = make_listener(tmp_path, max_associations=8)
    scp.start()
    senders, per_sender = 8, 20
    try:
        batches = []
        for s in range(senders):
            folder = tmp_path / f"sender{s}"
            folder.mkdir()
            batches.append([
                write(folder, f"{n}.dcm", instance(
                    "explicit_le", sop_instance_uid=unique_uid(13, s, n),
                    stored=factory.ramp(512, 512),
                ))
                for n in range(per_sender)
            ])  # fmt: skip
        start = time.perf_counter()
        processes = [
            subprocess.Popen(storescu(scp.port, *files), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for files in batches
        ]  # fmt: skip
        results = [(*p.communicate(timeout=120), p.returncode) for p in processes]
        elapsed = time.perf_counter() - start
        assert [rc for _, _, rc in results] == [0] * senders, [err for _, err, _ in results]
        expected = {unique_uid(13, s, n) for s in range(senders) for n in range(per_sender)}
        assert len(scp.spool) == senders * per_sender
        assert set(drain(scp.spool)) == expected
        stats = scp.stats.snapshot()
        assert stats["spooled"] == 160 and stats["associations_accepted"] == senders
        assert stats["associations_aborted"] == 0
        with capsys.disabled():
            print(
                f"\n{senders} storescu x {per_sender} images (512x512 16-bit, explicit LE): "
                f"{elapsed:.2f} s wall, {senders * per_sender / elapsed:.0f} images/s"
            )
    finally:
        scp.stop(drain_seconds=5)


def big_file(folder: Path, uid: str) -> Path:
    """48 MiB of pixels: about 750 P-DATA PDUs of 64 KiB."""
    pixels = (np.arange(5000 * 5000, dtype=np.uint32).reshape(5000, 5000) & 0x0FFF).astype(
        np.uint16
    )
    return write(folder, "big.dcm", instance(
        "explicit_le", sop_instance_uid=uid, stored=pixels, bits_stored=12
    ))  # fmt: skip


def test_a_sender_killed_mid_transfer_leaves_no_spool_entry(dcmtk: None, tmp_path: Path) -> None:
    scp = make_listener(tmp_path)
    scp.start()
    try:
        big = big_file(tmp_path, unique_uid(14, 1))
        received = threading.Event()
        pdus = [0]

        def on_pdu(event: evt.Event) -> None:
            pdus[0] += 1
            if pdus[0] >= 40:
                received.set()

        assert scp._server is not None
        scp._server.bind(evt.EVT_PDU_RECV, on_pdu)
        sender = subprocess.Popen(storescu(scp.port, big), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            assert received.wait(timeout=60), "the transfer never started"
            os.kill(sender.pid, signal.SIGKILL)
        finally:
            sender.wait(timeout=30)
        assert sender.returncode == -signal.SIGKILL
        assert wait_until(lambda: not scp._server.active_associations, timeout=30)  # type: ignore[union-attr]
        assert scp.stats.spooled == 0, "the transfer finished before the kill: enlarge the file"
        assert len(scp.spool) == 0
        assert list(scp.spool.pending_dir.iterdir()) == []  # no entry, no temporary file
        assert echo(scp.port).returncode == 0  # and the listener still answers
    finally:
        scp.stop(drain_seconds=5)


def test_garbage_on_the_port_does_not_kill_the_listener(
    dcmtk: None, listener: StorageListener
) -> None:
    rng = np.random.default_rng(7)
    payloads = [
        rng.bytes(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        # an A-ASSOCIATE-RQ header that declares a 4 GiB PDU, then nothing
        b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 10,
        b"\x04\x00\x00\x00\x00\x10" + rng.bytes(16),  # a P-DATA before any association
    ]
    for payload in payloads:
        with socket.create_connection((LOOPBACK, listener.port), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            try:
                while sock.recv(4096):  # read what it answers (an abort) until it closes
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
    done = echo(listener.port)
    assert done.returncode == 0, done.stderr
    assert listener.stats.echoes == 1


def test_no_patient_data_reaches_the_logs(
    dcmtk: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name, patient_id = "Doe^Jane^Q", "MRN-0042-PHI"

    def leaky_gate(ds: pydicom.Dataset) -> str | None:
        if ds.get("ViewPosition") == "AP":  # a gate bug whose message quotes a header value
            raise KeyError(f"{ds.PatientName} {ds.PatientID}")
        return chest_gate(ds)

    spool = Spool(tmp_path / "spool", max_entries=10, max_bytes=10**9)
    scp = StorageListener(spool=spool, gate=leaky_gate, port=0, host=LOOPBACK)
    caplog.set_level("DEBUG")
    scp.start()
    try:
        files = [
            write(tmp_path, f"{view}.dcm", instance(
                sop_instance_uid=unique_uid(16, n), view=view,
                extra={"PatientName": name, "PatientID": patient_id},
            ))
            for n, view in enumerate(("PA", "LL", "AP"))  # storescu stops after a failure
        ]  # fmt: skip
        done = run_tool(storescu(scp.port, *files))
        assert done.returncode != 0  # the AP one failed with 0xC000
    finally:
        scp.stop(drain_seconds=5)
    stats = scp.stats.snapshot()
    assert (stats["spooled"], stats["failed_unreadable"], stats["ignored_not_intended_use"]) == (
        1,
        1,
        1,
    )
    assert caplog.records, "nothing was logged: the test would prove nothing"
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert name not in text and "Doe" not in text and patient_id not in text


class SlowSender:
    """A pynetdicom SCU whose socket pauses before each PDU: one C-STORE of a 48 MiB image that
    lasts seconds, so a stop can be made to land in the middle of it."""

    def __init__(self, port: int, path: Path, pause: float = 0.005):
        ae = AE(ae_title=SENDER)
        ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
        self.dataset = pydicom.dcmread(path)
        self.assoc = ae.associate(LOOPBACK, port, ae_title=CALLED)
        assert self.assoc.is_established
        socket_ = self.assoc.dul.socket
        assert socket_ is not None
        original = socket_.send

        def slow_send(data: bytes) -> None:
            time.sleep(pause)
            original(data)

        socket_.send = slow_send  # type: ignore[method-assign]
        self.status: int | None = None
        self.thread = threading.Thread(target=self._send)

    def _send(self) -> None:
        answer = self.assoc.send_c_store(self.dataset)
        self.status = int(answer.Status) if "Status" in answer else None
        if self.assoc.is_established:
            self.assoc.release()

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()


def test_stop_lets_a_running_association_finish_and_then_refuses(
    dcmtk: None, tmp_path: Path
) -> None:
    scp = make_listener(tmp_path)
    scp.start()
    port = scp.port
    sender = SlowSender(port, big_file(tmp_path, unique_uid(15, 1)))
    sender.start()
    time.sleep(0.5)
    assert scp.stats.spooled == 0  # still sending when the stop begins
    began = time.monotonic()
    drained = scp.stop(drain_seconds=60)
    waited = time.monotonic() - began
    sender.join()
    assert drained is True
    assert sender.status == 0x0000
    assert scp.stats.spooled == 1 and len(scp.spool) == 1
    assert waited > 0.5  # it did wait for the transfer
    assert echo(port).returncode != 0  # no new association after the stop


def test_stop_aborts_what_outlasts_the_drain_window(dcmtk: None, tmp_path: Path) -> None:
    scp = make_listener(tmp_path)
    scp.start()
    sender = SlowSender(scp.port, big_file(tmp_path, unique_uid(17, 1)))
    sender.start()
    time.sleep(0.5)
    began = time.monotonic()
    drained = scp.stop(drain_seconds=0.5)
    assert time.monotonic() - began < 3  # bounded: it did not wait for the transfer
    sender.join()
    assert drained is False
    assert sender.assoc.is_aborted and sender.status is None
    assert scp.stats.spooled == 0
    assert len(scp.spool) == 0 and list(scp.spool.pending_dir.iterdir()) == []


def test_a_dx_for_presentation_image_is_spooled(
    dcmtk: None, listener: StorageListener, profiles: Path, tmp_path: Path
) -> None:
    path = write(tmp_path, "dx.dcm", instance(
        "j2k", sop_instance_uid=unique_uid(18, 1), modality="DX", sop_class=DX_FOR_PRESENTATION,
    ))  # fmt: skip
    done = run_tool(storescu(listener.port, path, extra=("-xf", str(profiles), "J2K")))
    assert done.returncode == 0, done.stderr
    entry = listener.spool.claim()
    assert entry is not None and entry.meta["sop_class_uid"] == DX_FOR_PRESENTATION
    assert entry.meta["transfer_syntax"] == str(factory.SYNTAXES["j2k"])
