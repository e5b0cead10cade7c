"""The header deadline of `pneumonia-serve`: a connection trickling its headers, or sending
nothing, gets 408 `headers_too_slow` and is closed once `CXR_HEADER_TIMEOUT_S` has passed; a
kept-alive connection's next request gets its own deadline from its first byte; normal requests
are untouched. And liveness fails when the event loop stops beating."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx

from app.http.probes import LIVE_PATH, LOOP_STALLED, READY_PATH, ProbeAnswers
from app.serving.state import ServiceState
from app.testing.server import free_port
from tests.support.testkit import UvicornProcess, encode, process_settings, xray_like

HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 9\r\n"


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it closed, in seconds."""
    started = time.perf_counter()
    sock.settimeout(limit_s)
    answer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return answer, time.perf_counter() - started
        answer += data


def trickle_headers(sock: socket.socket, every_s: float, limit_s: float) -> tuple[bytes, float]:
    """Send the headers a byte every `every_s`, never finishing them; what came back and when
    the server closed."""
    started = time.perf_counter()
    sock.settimeout(every_s)
    answer = b""
    for position in range(int(limit_s / every_s)):
        try:
            sock.sendall(HEAD[position % len(HEAD) : position % len(HEAD) + 1])
        except OSError:
            break
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        answer += data
    return answer, time.perf_counter() - started


def assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "headers_too_slow"


def test_slow_and_silent_headers_are_cut_off_and_normal_requests_are_not(tmp_path: Path) -> None:
    settings = process_settings(tmp_path, header_timeout_s="1.0")
    image = encode(xray_like(), "PNG")
    with UvicornProcess.serving(tmp_path / "server.log", settings) as server:
        address = ("127.0.0.1", server.port)
        with socket.create_connection(address) as trickling:
            answer, closed_after = trickle_headers(trickling, every_s=0.1, limit_s=8.0)
        assert_408(answer)
        assert 0.8 <= closed_after < 3.0, closed_after
        with socket.create_connection(address) as silent:
            answer, closed_after = read_until_closed(silent, limit_s=8.0)
        assert_408(answer)
        assert 0.8 <= closed_after < 3.0, closed_after
        # A kept-alive connection: each request answered, then a second request that stalls in
        # its headers long after the first was answered is cut off a deadline after its first
        # byte, not after the connection was made.
        with httpx.Client(base_url=server.base_url) as client:
            for _ in range(3):
                ok = client.post("/predict", content=image, headers={"content-type": "image/png"})
                assert ok.status_code == 200, ok.text
                time.sleep(0.5)  # 1.5 s on one connection, past the deadline: still served
        with socket.create_connection(address) as kept:
            kept.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            kept.settimeout(5)
            first = b""
            while not first.endswith(b'{"status":"alive"}'):  # the whole answer, body included
                data = kept.recv(65536)
                assert data, first
                first += data
            assert first.startswith(b"HTTP/1.1 200")
            time.sleep(0.6)
            kept.sendall(b"GET /health/live HTTP/1.1\r\n")
            started = time.perf_counter()
            answer, _ = read_until_closed(kept, limit_s=8.0)
            assert_408(answer)
            assert 0.8 <= time.perf_counter() - started < 3.0
        assert httpx.get(f"{server.base_url}/health/ready").status_code == 200
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert "cxr_slow_headers_closed_total 3.0" in metrics


def test_liveness_fails_when_the_event_loop_stops_beating() -> None:
    answers = ProbeAnswers(loop_stall_s=2.0)
    state = ServiceState()
    assert answers.answer(state, LIVE_PATH)[0] == 200  # before the first beat
    state.loop_beat = time.monotonic() - 1.0
    assert answers.answer(state, LIVE_PATH)[0] == 200
    state.loop_beat = time.monotonic() - 3.0
    for path in (LIVE_PATH, READY_PATH):
        status, body = answers.answer(state, path)
        assert status == 503
        assert json.loads(body)["error"]["code"] == LOOP_STALLED


def test_a_running_service_keeps_its_loop_beating(tmp_path: Path) -> None:
    """The heartbeat runs in the real service: after longer than the stall limit, the probe
    port's liveness (answered from its own thread) is still 200."""
    probe_port = str(free_port())
    # The limit is four heartbeats (one every 0.5 s), so that a loaded machine's late beat is
    # not read as a stalled loop; the test runs past it.
    settings = process_settings(tmp_path, loop_stall_s="2.0", probe_port=probe_port)
    with UvicornProcess.serving(tmp_path / "server.log", settings):
        for _ in range(6):
            time.sleep(0.5)
            live = httpx.get(f"http://127.0.0.1:{probe_port}/health/live")
            assert live.status_code == 200, live.text
