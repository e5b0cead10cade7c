"""Orthanc (Debian's 1.10) as a PACS router in front of the C-STORE SCP, all on 127.0.0.1: it
forwards a real JPEG 2000 CR chest PA as it holds it, and a router's job stays green for an image
outside the intended use (accepted, not spooled)."""

from __future__ import annotations

import io
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.pacs.scp import StorageListener
from app.pacs.spool import Spool
from app.testing.server import free_port
from tests.app.pacs.intake_tools import LOOPBACK, chest_gate, require_tool, wait_until

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


class Orthanc:
    def __init__(self, binary: str, workdir: Path, modalities: dict[str, list[Any]]):
        self.http_port = free_port()
        config = {
            "Name": "intake-router",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": free_port(),
            "DicomAet": "ORTHANC",
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": modalities,
            "DicomScuTimeout": 30,
        }
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = (workdir / "orthanc.log").open("w")
        self.process = subprocess.Popen([binary, str(path)], stdout=self.log, stderr=self.log)

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def ready(self) -> bool:
        try:
            self.request("GET", "/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[tuple[Orthanc, StorageListener]]:
    binary = require_tool("Orthanc")
    listener = StorageListener(
        spool=Spool(tmp_path / "spool", max_entries=10, max_bytes=10**9),
        gate=chest_gate, port=0, host=LOOPBACK, allowed_calling_aets={"ORTHANC"},
    )  # fmt: skip
    listener.start()
    orthanc = Orthanc(binary, tmp_path, {"cxr_ai": ["CXR_AI", LOOPBACK, listener.port]})
    try:
        assert wait_until(orthanc.ready, timeout=60, interval=0.2), (
            tmp_path / "orthanc.log"
        ).read_text()[-2000:]
        yield orthanc, listener
    finally:
        orthanc.close()
        listener.stop(drain_seconds=5)


def route(orthanc: Orthanc, filename: str) -> pydicom.Dataset:
    data = Path(get_testdata_file(filename)).read_bytes()  # type: ignore[arg-type]
    uploaded = orthanc.request("POST", "/instances", data)
    job = json.dumps({"Resources": [uploaded["ID"]], "Synchronous": True}).encode()
    orthanc.request("POST", "/modalities/cxr_ai/store", job)  # raises on a failed transfer
    return pydicom.dcmread(io.BytesIO(data))


def test_orthanc_forwards_a_jpeg2000_cr_chest_that_lands_in_the_spool(
    routed: tuple[Orthanc, StorageListener],
) -> None:
    orthanc, listener = routed
    original = route(orthanc, "RG1_J2KR.dcm")
    assert original.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    entry = listener.spool.claim()
    assert entry is not None
    assert entry.sop_instance_uid == original.SOPInstanceUID
    assert entry.meta["transfer_syntax"] == JPEG2000_LOSSLESS  # not transcoded on the way
    assert entry.meta["calling_ae"] == "ORTHANC"
    received = pydicom.dcmread(io.BytesIO(entry.read_data()))
    assert received.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    assert received.PixelData == original.PixelData
    assert listener.stats.spooled == 1


def test_orthanc_routing_an_extremity_succeeds_and_nothing_is_spooled(
    routed: tuple[Orthanc, StorageListener],
) -> None:
    orthanc, listener = routed
    original = route(orthanc, "RG3_J2KI.dcm")
    assert str(original.get("BodyPartExamined", "")).upper() != "CHEST"
    assert len(listener.spool) == 0
    assert listener.stats.ignored_not_intended_use == 1
