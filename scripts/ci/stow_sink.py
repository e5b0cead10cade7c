"""A DICOMweb STOW-RS receiver that counts what it is sent, for the replica stage.

    python stow_sink.py --port 8080        # inside the service image (pydicom is there)

`POST /dicom-web/studies` takes a multipart/related body of DICOM instances and answers 200 with a
Store Instances Response listing each one as stored, recording every instance (SOP Instance UID,
the sender's address, the time). `GET /counts` returns what was stored and what was held, as JSON.
`POST /hold` makes later stores wait, unanswered, until `POST /release`, after which they are
answered 503 and not counted: a sender that was killed while waiting never got an answer, and its
delivery must reach the sink again, from another sender, exactly once.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom

_lock = threading.Lock()
_released = threading.Event()
_released.set()
_stored: dict[str, list[dict[str, Any]]] = {}
_held: list[dict[str, Any]] = []


def instances(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of each DICOM part of a multipart/related body."""
    boundary = ""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError("no boundary")
    found = []
    for part in body.split(b"--" + boundary.encode("ascii"))[1:]:
        if part.startswith(b"--"):
            break
        _, _, payload = part.partition(b"\r\n\r\n")
        payload = payload.removesuffix(b"\r\n")
        dataset = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True)
        found.append((str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)))
    return found


def store_response(stored: list[tuple[str, str]]) -> bytes:
    items = [
        {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [uid]}}
        for cls, uid in stored
    ]
    return json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode("ascii")


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/counts":
            with _lock:
                body = json.dumps({"stored": _stored, "held": _held}).encode("ascii")
            self._answer(200, body)
        else:
            self._answer(404, b"{}")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path in ("/hold", "/release"):
            if self.path == "/hold":
                _released.clear()
            else:
                _released.set()
            self._answer(200, b"{}")
            return
        if self.path.rstrip("/") != "/dicom-web/studies":
            self._answer(404, b"{}")
            return
        try:
            found = instances(body, self.headers.get("Content-Type", ""))
        except (ValueError, pydicom.errors.InvalidDicomError) as exc:
            self._answer(400, json.dumps({"error": str(exc)}).encode())
            return
        sender = self.client_address[0]
        if not _released.is_set():
            with _lock:
                _held.extend({"uid": uid, "sender": sender, "at": time.time()} for _, uid in found)
            _released.wait()
            self._answer(503, b"{}")
            return
        with _lock:
            for _, uid in found:
                _stored.setdefault(uid, []).append({"sender": sender, "at": time.time()})
        self._answer(200, store_response(found), "application/dicom+json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    # PID 1 in its container: without a handler SIGTERM would be ignored until Docker's SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = ThreadingHTTPServer(("0.0.0.0", args.port), Sink)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
