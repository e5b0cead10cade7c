"""`dicomweb-client`, a real STOW-RS user agent, posting to the STOW core behind a minimal stdlib
HTTP server on 127.0.0.1: its quoted boundary, its chunked transfer above 1 MB, and its reading of
our Store Instances Response."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from app.pacs.spool import Spool
from app.pacs.stow import StowError, spool_accept, store_instances
from app.testing import dicom_files as factory
from tests.app.pacs.intake_tools import LOOPBACK, chest_gate, instance, unique_uid

MAX_BODY = 64 * 1024 * 1024


def read_chunked(stream: Any, limit: int) -> bytes:
    """An HTTP/1.1 chunked body (http.server does not de-chunk), bounded by `limit`."""
    body = bytearray()
    for _ in range(100_000):
        size = int(stream.readline(100).split(b";")[0].strip(), 16)
        if size == 0:
            while stream.readline(1000).strip():  # trailers
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise ValueError("body over the limit")
        body += stream.read(size)
        stream.readline(10)  # CRLF after the chunk
    raise ValueError("too many chunks")


class StowServer(ThreadingHTTPServer):
    def __init__(self, spool: Spool):
        super().__init__((LOOPBACK, 0), StowHandler)
        self.spool = spool
        self.requests: list[dict[str, Any]] = []


class StowHandler(BaseHTTPRequestHandler):
    server: StowServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = read_chunked(self.rfile, MAX_BODY)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        path = self.path.split("?")[0].rstrip("/")
        study = path.split("/studies/", 1)[1] if "/studies/" in path else None
        self.server.requests.append({"headers": dict(self.headers), "body": body, "study": study})

        try:
            response = store_instances(
                body, self.headers.get("Content-Type", ""), gate=chest_gate,
                accept=spool_accept(self.server.spool), study=study,
                study_url=f"http://{LOOPBACK}:{self.server.server_port}{path}",
                instance_url=lambda st, se, sop: f"http://{LOOPBACK}/results/{sop}",
            )  # fmt: skip
        except StowError as error:
            self.send_response(error.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = response.body
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StowServer]:
    stow_server = StowServer(Spool(tmp_path / "spool", max_entries=100, max_bytes=10**9))
    thread = threading.Thread(target=stow_server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stow_server
    finally:
        stow_server.shutdown()
        stow_server.server_close()
        thread.join(timeout=10)


def client(server: StowServer) -> DICOMwebClient:
    return DICOMwebClient(url=f"http://{LOOPBACK}:{server.server_port}")


def dataset(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_dicomweb_client_stores_two_instances_over_a_chunked_request(server: StowServer) -> None:
    big = (np.arange(1200 * 1000, dtype=np.uint32).reshape(1200, 1000) & 0x0FFF).astype(np.uint16)
    files = [
        instance("explicit_le", sop_instance_uid=unique_uid(6, 1), stored=big, bits_stored=12),
        instance("j2k_lossless", sop_instance_uid=unique_uid(6, 2)),
    ]
    result = client(server).store_instances([dataset(f) for f in files])
    [request] = server.requests
    # the encoding this client really uses: quoted boundary, chunked above its 1 MB chunk size
    assert 'boundary="' in request["headers"]["Content-Type"]
    assert request["headers"].get("Transfer-Encoding") == "chunked"
    assert len(request["body"]) > 2_000_000
    # what the client read back from our response
    stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert stored == [unique_uid(6, 1), unique_uid(6, 2)]
    assert result.ReferencedSOPSequence[1].RetrieveURL.endswith(f"/results/{unique_uid(6, 2)}")
    assert "FailedSOPSequence" not in result
    # and what reached the spool is the instance, pixel data byte for byte
    spool = server.spool
    received = {}
    for _ in range(2):
        entry = spool.claim()
        assert entry is not None
        received[entry.sop_instance_uid] = dataset(entry.read_data())
        assert entry.meta["source"] == "stow"
        assert entry.meta["transfer_syntax"] == str(
            received[entry.sop_instance_uid].file_meta.TransferSyntaxUID
        )
    for data in files:
        sent = dataset(data)
        got = received[str(sent.SOPInstanceUID)]
        assert got.PixelData == sent.PixelData
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID


def test_dicomweb_client_to_a_study_reads_the_202_per_instance(server: StowServer) -> None:
    good = instance("jpeg_ls", sop_instance_uid=unique_uid(6, 3))
    elsewhere = instance(
        "explicit_le", sop_instance_uid=unique_uid(6, 4), study_uid="1.2.826.0.1.3680043.10.1001.77"
    )
    result = client(server).store_instances(
        [dataset(good), dataset(elsewhere)], study_instance_uid=factory.STUDY_UID
    )
    assert server.requests[0]["study"] == factory.STUDY_UID
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [unique_uid(6, 3)]
    [failed] = result.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == unique_uid(6, 4)
    assert failed.FailureReason == 0xA901
    assert len(server.spool) == 1


def test_dicomweb_client_raises_on_409_with_the_reasons_in_the_body(server: StowServer) -> None:
    ct = instance(
        "explicit_le", sop_instance_uid=unique_uid(6, 5), modality="CT",
        sop_class=factory.CT_STORAGE,
    )  # fmt: skip
    with pytest.raises(requests.HTTPError) as caught:
        client(server).store_instances([dataset(ct)])
    assert caught.value.response.status_code == 409
    document = Dataset.from_json(caught.value.response.json())
    assert document.FailedSOPSequence[0].FailureReason == 0x0122
    assert len(server.spool) == 0
