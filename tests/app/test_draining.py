"""Graceful draining with a real uvicorn process, a real signal and real load: readiness turns
503 at once while the socket stays open and requests are still served; what is unanswered when
the window ends, or when uvicorn's own graceful-shutdown timeout expires, gets a JSON 503 with
Retry-After; never a 500, never a traceback."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cxr_testkit import UvicornProcess, encode, write_model_dir
from PIL import Image

from app.draining import RETRY_AFTER_SECONDS

# Each inference squares a 2240x2240 matrix (about 0.3 s on one core) and only one runs at a time,
# so CONCURRENT requests queue for several seconds: longer than the drain window below.
BUSY_WORK = 10
CONCURRENT = 16
DRAIN_SECONDS = 2.0


@dataclass
class Outcome:
    status: int | None
    body: dict | None
    headers: httpx.Headers | None
    finished: float
    error: str | None = None


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    settings = {
        "CXR_MODEL_METADATA": str(write_model_dir(tmp_path, busy_work=BUSY_WORK)),
        "CXR_PROVIDER": "cpu",
        "CXR_ORT_INTRA_OP_THREADS": "1",
        "CXR_INFERENCE_CONCURRENCY": "1",
        "CXR_LOG_LEVEL": "info",
    }
    yield tmp_path, settings


def _post_in_background(
    server: UvicornProcess, n: int
) -> tuple[list[Outcome], list[threading.Thread]]:
    jpeg = encode(Image.new("L", (256, 256), 200), "JPEG")
    outcomes: list[Outcome] = []

    def post() -> None:
        try:
            # One connection per request, as separate clients behind a load balancer would be.
            response = httpx.post(
                f"{server.base_url}/predict",
                content=jpeg,
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            outcomes.append(Outcome(None, None, None, time.monotonic(), repr(exc)))
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        outcomes.append(Outcome(response.status_code, body, response.headers, time.monotonic()))

    threads = [threading.Thread(target=post) for _ in range(n)]
    for thread in threads:
        thread.start()
    return outcomes, threads


def _assert_all_answered_200_or_json_503(outcomes: list[Outcome], expected: int) -> None:
    assert len(outcomes) == expected
    assert [o.error for o in outcomes if o.error] == []
    assert {o.status for o in outcomes} <= {200, 503}, [o.status for o in outcomes]
    for outcome in outcomes:
        if outcome.status == 503:
            assert outcome.body == {
                "error": {
                    "code": "shutting_down",
                    "message": "this instance is shutting down; retry the request",
                }
            }
            assert outcome.headers is not None
            assert outcome.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
        else:
            assert outcome.body is not None and outcome.body["label"] == "PNEUMONIA"


def _assert_clean_log(log: str) -> None:
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
    assert "500" not in [str(json.loads(line).get("status")) for line in _json_lines(log)]


def _json_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("{")]


def _wait_for_queue(server: UvicornProcess, n: int) -> None:
    """Until the server holds at least n requests (each logs nothing before it finishes, so
    count from the outside: connections the kernel shows as established to the port)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _established_connections(server.port) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never held {n} connections")


def _established_connections(port: int) -> int:
    hex_port = f"{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if local.endswith(f":{hex_port}") and state == "01":  # 01 = ESTABLISHED
                count += 1
    return count


def test_sigterm_under_load_keeps_serving_through_the_window_then_answers_the_queue_503(
    slow_server: tuple[Path, dict[str, str]],
) -> None:
    workdir, settings = slow_server
    settings["CXR_DRAIN_SECONDS"] = str(DRAIN_SECONDS)
    server = UvicornProcess.start(
        workdir / "server.log", settings, ["--timeout-graceful-shutdown", "10"]
    )
    try:
        server.wait_until_ready()
        outcomes, threads = _post_in_background(server, CONCURRENT)
        _wait_for_queue(server, CONCURRENT)

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Throughout the window the socket accepts connections and readiness answers 503 ...
        probes: list[tuple[float, int]] = []
        while time.monotonic() - signalled < DRAIN_SECONDS - 0.3:
            probe = httpx.get(f"{server.base_url}/health/ready", timeout=5)
            probes.append((time.monotonic() - signalled, probe.status_code))
            assert probe.status_code == 503
            assert probe.json()["error"] == {"code": "not_ready", "message": "shutting down"}
            time.sleep(0.1)
        assert probes[0][0] < 0.5 and probes[-1][0] > DRAIN_SECONDS - 0.6
        # ... and liveness still holds: the process is not to be restarted while it drains.
        assert httpx.get(f"{server.base_url}/health/live", timeout=5).status_code == 200
        for thread in threads:
            thread.join(timeout=30)

        exit_code = server.process.wait(timeout=30)
    finally:
        server.kill()

    assert exit_code in (0, -signal.SIGTERM)
    _assert_all_answered_200_or_json_503(outcomes, CONCURRENT)
    served = [o for o in outcomes if o.status == 200 and o.finished > signalled + 0.1]
    refused = [o for o in outcomes if o.status == 503]
    # Requests kept being served after the signal, and the queue outlived the window.
    assert served, "no request was served during the drain window"
    assert refused, "the queue was shorter than the window: nothing was answered 503"
    assert min(o.finished for o in refused) > signalled + DRAIN_SECONDS - 0.1
    log = server.log()
    _assert_clean_log(log)
    events = [json.loads(line) for line in _json_lines(log)]
    window_over = next(e for e in events if e["event"] == "drain window over")
    # Cancelled at the deadline: the refused ones, plus at most the one inference then running.
    assert len(refused) <= window_over["unanswered"] <= len(refused) + 1
    logged_503 = [e for e in events if e["event"] == "request" and e["status"] == 503]
    assert len([e for e in logged_503 if e["route"] == "/predict"]) == len(refused)


def test_when_uvicorns_graceful_timeout_cancels_requests_they_get_json_503(
    slow_server: tuple[Path, dict[str, str]],
) -> None:
    # SIGINT skips the drain window: uvicorn stops listening at once, waits one second for the
    # queued requests, then cancels their tasks.
    workdir, settings = slow_server
    server = UvicornProcess.start(
        workdir / "server.log", settings, ["--timeout-graceful-shutdown", "1"]
    )
    try:
        server.wait_until_ready()
        outcomes, threads = _post_in_background(server, CONCURRENT)
        _wait_for_queue(server, CONCURRENT)
        server.process.send_signal(signal.SIGINT)
        for thread in threads:
            thread.join(timeout=30)
        exit_code = server.process.wait(timeout=30)
    finally:
        server.kill()

    assert exit_code in (0, -signal.SIGINT)
    _assert_all_answered_200_or_json_503(outcomes, CONCURRENT)
    assert any(o.status == 503 for o in outcomes)
    log = server.log()
    assert "timeout graceful shutdown exceeded" in log  # the path under test was taken
    _assert_clean_log(log)
