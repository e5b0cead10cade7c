"""The real thing: `python -m uvicorn app.main:app` as a subprocess on 127.0.0.1, configured only
through `CXR_*` environment variables, exercised over real HTTP, then stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cxr_testkit import build_onnx, encode, metadata_for, xray_like
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
UPLOAD_LIMIT = 200_000
# A file name that must never reach the logs: it stands in for patient identifiers.
PATIENT_FILE_NAME = "DOE_JANE_MRN0012345.jpg"


@dataclass
class Server:
    base_url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("served_model")
    onnx_bytes = build_onnx()
    meta = metadata_for(onnx_bytes)
    (workdir / meta["onnx_file"]).write_bytes(onnx_bytes)
    (workdir / "model.json").write_text(json.dumps(meta))

    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    env.update(
        CXR_MODEL_METADATA=str(workdir / "model.json"),
        CXR_PROVIDER="cpu",
        CXR_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        CXR_ORT_INTRA_OP_THREADS="1",
        CXR_LOG_LEVEL="info",
    )
    port = _free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _wait_until_ready(server: Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"uvicorn exited early:\n{server.log_path.read_text()}")
        try:
            if httpx.get(f"{server.base_url}/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"not ready after {timeout_s}s:\n{server.log_path.read_text()}")


def test_live_ready_predict_and_errors_over_real_http(server: Server) -> None:
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


def test_chunked_upload_over_the_limit_is_cut_off(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"\xff\xd8\xff"
        for _ in range(UPLOAD_LIMIT // 8192 + 10):
            yield b"\0" * 8192

    response = httpx.post(
        f"{server.base_url}/predict", content=chunks(), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server: Server) -> None:
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


def test_sigterm_stops_it_cleanly_and_logs_hold_no_patient_data(server: Server) -> None:
    # Runs last in this module: it stops the shared server.
    assert httpx.get(f"{server.base_url}/health/ready").status_code == 200
    server.process.send_signal(signal.SIGTERM)
    # After a graceful shutdown uvicorn re-raises the signal it caught, so that supervisors see
    # why it stopped: "clean" is exit status 0 or death by that same SIGTERM, with the lifespan's
    # shutdown completed.
    assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)

    log = server.log_path.read_text()
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
