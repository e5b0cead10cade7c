"""The real thing: `python -m uvicorn app.main:app` as a subprocess on 127.0.0.1, configured only
through `CXR_*` environment variables, exercised over real HTTP, then stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.support.testkit import UvicornProcess, encode, process_settings, xray_like

UPLOAD_LIMIT = 200_000
# A file name that must never reach the logs: it stands in for patient identifiers.
PATIENT_FILE_NAME = "DOE_JANE_MRN0012345.jpg"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    workdir = tmp_path_factory.mktemp("served_model")
    settings = process_settings(workdir, max_upload_bytes=str(UPLOAD_LIMIT), log_level="info")
    with UvicornProcess.serving(workdir / "server.log", settings) as server:
        yield server


def test_live_ready_predict_and_errors_over_real_http(server: UvicornProcess) -> None:
    assert httpx.get(f"{server.base_url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{server.base_url}/health/ready").json()["status"] == "ready"

    jpeg = encode(Image.new("L", (1600, 1400), 235), "JPEG")
    response = httpx.post(
        f"{server.base_url}/predict", files={"file": (PATIENT_FILE_NAME, jpeg, "image/jpeg")}
    )
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "PNEUMONIA"
    assert response.headers["x-request-id"] == response.json()["request_id"]

    gif = httpx.post(
        f"{server.base_url}/predict",
        content=encode(xray_like(), "GIF"),
        headers={"content-type": "image/jpeg"},
    )
    assert gif.status_code == 415
    assert gif.json()["error"]["code"] == "unsupported_media_type"


def test_chunked_upload_over_the_limit_is_cut_off(server: UvicornProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"\xff\xd8\xff"
        for _ in range(UPLOAD_LIMIT // 8192 + 10):
            yield b"\0" * 8192

    response = httpx.post(
        f"{server.base_url}/predict", content=chunks(), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server: UvicornProcess) -> None:
    # Send only the headers of a 1 GB upload: the answer must come without waiting for the body.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        reply = b""
        while b'"}}' not in reply:  # the error JSON's last bytes; headers may arrive first
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"payload_too_large"' in reply


def test_sigterm_stops_it_cleanly_and_logs_hold_no_patient_data(server: UvicornProcess) -> None:
    # Runs last in this module: it stops the shared server.
    assert httpx.get(f"{server.base_url}/health/ready").status_code == 200
    server.process.send_signal(signal.SIGTERM)
    # After a graceful shutdown uvicorn re-raises the signal it caught, so that supervisors see
    # why it stopped: "clean" is exit status 0 or death by that same SIGTERM, with the lifespan's
    # shutdown completed.
    assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)

    log = server.log()
    assert "Application shutdown complete" in log
    request_lines = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "request"
    ]
    predicts = [entry for entry in request_lines if entry["route"] == "/predict"]
    assert {entry["status"] for entry in predicts} >= {200, 413, 415}
    ok = next(entry for entry in predicts if entry["status"] == 200)
    assert ok["decode_ms"] > 0 and ok["inference_ms"] > 0
    assert ok["body_size"] == "<=64KiB"
    assert "model ready" in log
    assert "shutting down" in log
    assert "DOE_JANE" not in log and "MRN0012345" not in log
