"""Graceful draining with a real uvicorn process, a real signal and real load: readiness turns
503 at once while the socket stays open and requests are still served; what is unanswered when
the window ends, or when uvicorn's own graceful-shutdown timeout expires, gets a JSON 503 with
Retry-After; never a 500, never a traceback."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from app.settings import Settings
from tests.support.testkit import UvicornProcess, encode, process_settings

# the service's one Retry-After (CXR_RETRY_AFTER_S), unset in these processes
RETRY_AFTER_SECONDS = Settings.model_fields["retry_after_s"].default

# Each inference squares a 3136x3136 matrix (about 0.27 s on one core of a fast spell of this
# machine, 0.8 s in a slow one) and only one runs at a time, so CONCURRENT requests queue for 6 s or
# more: far longer than the drain window below. (2240x2240 and 16 requests queued for only 1.6 s on
# a fast core, shorter than the window, and the test failed for want of a queue.)
BUSY_WORK = 14
CONCURRENT = 24
DRAIN_SECONDS = 2.0


@dataclass
class Outcome:
    status: int | None
    body: dict | None
    headers: httpx.Headers | None
    finished: float
    error: str | None = None


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


@dataclass
class Shutdown:
    outcomes: list[Outcome]
    signalled: float
    exit_code: int
    log: str


def _signal_under_load(
    workdir: Path,
    sig: signal.Signals,
    drain_seconds: float,
    graceful_timeout_s: int,
    while_draining: Callable[[UvicornProcess, float], None] = lambda server, signalled: None,
) -> Shutdown:
    """Start a slow server, queue CONCURRENT uploads on it, send `sig`, run `while_draining`,
    and collect every answer and the server's log once it has exited."""
    settings = process_settings(
        workdir,
        busy_work=BUSY_WORK,
        # one image per model run, so the queue drains one 0.3 s inference at a time
        max_batch_size="1",
        log_level="info",
        drain_seconds=str(drain_seconds),
    )
    args = ["--timeout-graceful-shutdown", str(graceful_timeout_s)]
    with UvicornProcess.serving(workdir / "server.log", settings, args) as server:
        outcomes, threads = _post_in_background(server, CONCURRENT)
        _wait_for_queue(server, CONCURRENT)
        signalled = time.monotonic()
        server.process.send_signal(sig)
        while_draining(server, signalled)
        for thread in threads:
            thread.join(timeout=30)
        exit_code = server.process.wait(timeout=30)
    return Shutdown(outcomes, signalled, exit_code, server.log())


def _probe_throughout_the_window(server: UvicornProcess, signalled: float) -> None:
    """Throughout the window the socket accepts connections, readiness answers 503, and liveness
    still holds (the process is not to be restarted while it drains). Readiness and liveness are
    probed in turn, each only while the window has time left for it."""
    answers: dict[str, list[tuple[float, httpx.Response]]] = {"ready": [], "live": []}
    while (elapsed := time.monotonic() - signalled) < DRAIN_SECONDS - 0.3:
        kind = "ready" if len(answers["ready"]) <= len(answers["live"]) else "live"
        answers[kind].append((elapsed, httpx.get(f"{server.base_url}/health/{kind}", timeout=5)))
        time.sleep(0.05)
    assert answers["ready"] and answers["live"]
    assert answers["ready"][0][0] < 0.5
    assert max(t for kind in answers.values() for t, _ in kind) > DRAIN_SECONDS - 0.8
    for _, response in answers["ready"]:
        assert response.status_code == 503
        assert response.json()["error"] == {"code": "not_ready", "message": "shutting down"}
    assert [response.status_code for _, response in answers["live"]] == [200] * len(answers["live"])


def test_sigterm_under_load_keeps_serving_through_the_window_then_answers_the_queue_503(
    tmp_path: Path,
) -> None:
    result = _signal_under_load(
        tmp_path, signal.SIGTERM, DRAIN_SECONDS, 10, _probe_throughout_the_window
    )

    assert result.exit_code in (0, -signal.SIGTERM)
    _assert_all_answered_200_or_json_503(result.outcomes, CONCURRENT)
    served = [o for o in result.outcomes if o.status == 200 and o.finished > result.signalled + 0.1]
    refused = [o for o in result.outcomes if o.status == 503]
    # Requests kept being served after the signal, and the queue outlived the window.
    assert served, "no request was served during the drain window"
    assert refused, "the queue was shorter than the window: nothing was answered 503"
    assert min(o.finished for o in refused) > result.signalled + DRAIN_SECONDS - 0.1
    _assert_clean_log(result.log)
    events = [json.loads(line) for line in _json_lines(result.log)]
    window_over = next(e for e in events if e["event"] == "drain window over")
    # Cancelled at the deadline: the refused ones, plus at most the one inference then running.
    assert len(refused) <= window_over["unanswered"] <= len(refused) + 1
    logged_503 = [e for e in events if e["event"] == "request" and e["status"] == 503]
    assert len([e for e in logged_503 if e["route"] == "/predict"]) == len(refused)


def test_when_uvicorns_graceful_timeout_cancels_requests_they_get_json_503(tmp_path: Path) -> None:
    # SIGINT skips the drain window: uvicorn stops listening at once, waits one second for the
    # queued requests, then cancels their tasks.
    result = _signal_under_load(tmp_path, signal.SIGINT, DRAIN_SECONDS, 1)

    assert result.exit_code in (0, -signal.SIGINT)
    _assert_all_answered_200_or_json_503(result.outcomes, CONCURRENT)
    assert any(o.status == 503 for o in result.outcomes)
    assert "timeout graceful shutdown exceeded" in result.log  # the path under test was taken
    _assert_clean_log(result.log)
