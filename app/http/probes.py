"""The health probes' answers, and a port of their own that a thread of its own serves.

`/health/live` and `/health/ready` on the main port are answered by the admission gate
(`app.http.admission_gate`) without routing or dependency resolution. That makes a probe cheap,
but it still waits its turn on the event loop: under overload, every connection that is ready in
the same loop iteration (refusals, bodies arriving, answers leaving) runs before it, and on two
shared cores one iteration can take hundreds of milliseconds. No per-request saving bounds that,
because the work in an iteration grows with the number of clients. So with `CXR_PROBE_PORT` set,
`ProbeServer` answers the two probes on that port from a thread that does nothing else: it needs
only the interpreter lock, which the event loop must hand over every few milliseconds (Python's
switch interval), so a probe there is answered in milliseconds whatever the main port is doing.
Both answers come from `ProbeAnswers`, by the one readiness rule (`ServiceState.not_ready_reason`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from app.errors import ModelNotReady
from app.http import schemas
from app.model.classifier import Classifier
from app.serving.state import ServiceState

LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
LIVE_BODY = b'{"status":"alive"}'
LOOP_STALLED = "event_loop_stalled"

logger = logging.getLogger("app.lifecycle")


class ProbeAnswers:
    """Status and JSON body of each probe; the ready body is rendered once per classifier.
    Safe to call from any thread: it only reads the state's attributes.

    Liveness is 503 `event_loop_stalled` when the event loop has not beaten for `loop_stall_s`
    (`ServiceState.loop_beat`, kept by the lifespan): answered from the probe port's thread, a
    live answer must not outlive the loop that serves everything else."""

    def __init__(self, loop_stall_s: float = 10.0) -> None:
        self._ready_body: tuple[Classifier, str | None, bytes] | None = None
        self.loop_stall_s = loop_stall_s

    def answer(self, state: ServiceState, path: str) -> tuple[int, bytes]:
        silence = state.loop_silence_s()
        if silence > self.loop_stall_s:
            message = f"the event loop has not run for {silence:.0f} s"
            error = {"code": LOOP_STALLED, "message": message}
            return HTTPStatus.SERVICE_UNAVAILABLE, json.dumps({"error": error}).encode()
        if path == LIVE_PATH:
            return HTTPStatus.OK, LIVE_BODY
        reason = state.not_ready_reason
        classifier = state.classifier
        if reason is not None or classifier is None:
            error = {"code": ModelNotReady.code, "message": reason or "model is not loaded"}
            return HTTPStatus.SERVICE_UNAVAILABLE, json.dumps({"error": error}).encode()
        down = state.dicom_listener_down
        cached = self._ready_body
        if cached is None or cached[0] is not classifier or cached[1] != down:
            answer = schemas.ReadyResponse(
                model=schemas.model_identity(classifier),
                execution_provider=classifier.execution_provider,
                dicom_listener_down=down,
            )
            cached = self._ready_body = (classifier, down, answer.model_dump_json().encode())
        return HTTPStatus.OK, cached[2]


class _ProbeHandler(BaseHTTPRequestHandler):
    server: _ProbeHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 5.0  # a connection that sends nothing is dropped

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path in (LIVE_PATH, READY_PATH):
            status, body = self.server.answers.answer(self.server.state(), path)
        else:
            status = HTTPStatus.NOT_FOUND
            body = json.dumps(
                {"error": {"code": "not_found", "message": "this port serves the health probes"}}
            ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes are not logged: they come every few seconds and say nothing new."""


class _ProbeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], state: Callable[[], ServiceState], answers: ProbeAnswers
    ) -> None:
        super().__init__(address, _ProbeHandler)
        self.state = state
        self.answers = answers

    def handle_error(self, request: object, client_address: object) -> None:
        """A checker that resets its connection (HAProxy's, a kubelet's on timeout) is routine:
        no traceback on stderr for it; anything else is one WARNING line with its type."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            return
        logger.warning("probe request failed", extra={"fields": {"error": type(error).__name__}})


class ProbeServer:
    """`/health/live` and `/health/ready` on `host`:`port`, served by a daemon thread."""

    def __init__(
        self, host: str, port: int, state: Callable[[], ServiceState], answers: ProbeAnswers
    ) -> None:
        self._server = _ProbeHTTPServer((host, port), state, answers)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cxr-probes", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        logger.info("probe port", extra={"fields": {"port": self.port}})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
