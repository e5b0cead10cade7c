"""The drain sequence in-process: readiness turns 503 the moment SIGTERM arrives, requests are
still served during the window, the server's own handler runs only when the window ends, and
requests that arrive after it get the JSON 503."""

from __future__ import annotations

import asyncio
import signal
import time

import anyio
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.draining import Drain
from app.main import create_app
from app.serving.state import SHUTTING_DOWN, ServiceState
from tests.support.testkit import encode, make_settings


@pytest.fixture
def server_handler_calls():
    """Stands in for uvicorn's handler, which is installed before the lifespan starts."""
    calls: list[tuple[int, float]] = []
    originals = {
        sig: signal.signal(sig, lambda signum, frame: calls.append((signum, time.monotonic())))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    yield calls
    for sig, original in originals.items():
        signal.signal(sig, original)


def test_sigterm_flips_readiness_at_once_and_hands_over_after_the_window(server_handler_calls):
    state = ServiceState()
    drain = Drain(window_seconds=0.3)

    async def scenario() -> tuple[float, bool, bool]:
        drain.install_signal_handlers(state)
        waiting = anyio.CancelScope()
        drain.track(waiting)
        sent = time.monotonic()
        signal.raise_signal(signal.SIGTERM)
        flipped_at_once = state.draining and state.not_ready_reason == SHUTTING_DOWN
        await asyncio.sleep(0.1)
        during_window = (server_handler_calls == [], not waiting.cancel_called, not drain.closed)
        assert during_window == (True, True, True)
        await asyncio.sleep(0.4)
        return sent, flipped_at_once, waiting.cancel_called

    sent, flipped_at_once, cancelled = asyncio.run(scenario())
    assert flipped_at_once
    assert cancelled and drain.closed  # the unanswered request was told to stop
    assert [signum for signum, _ in server_handler_calls] == [signal.SIGTERM]
    assert server_handler_calls[0][1] - sent >= 0.3


def test_a_second_sigterm_ends_the_window_early(server_handler_calls):
    drain = Drain(window_seconds=30)

    async def scenario() -> None:
        drain.install_signal_handlers(ServiceState())
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5
    assert [signum for signum, _ in server_handler_calls] == [signal.SIGTERM]
    assert drain.closed


def test_sigint_hands_over_at_once(server_handler_calls):
    state = ServiceState()
    drain = Drain(window_seconds=30)

    async def scenario() -> None:
        drain.install_signal_handlers(state)
        signal.raise_signal(signal.SIGINT)

    asyncio.run(scenario())
    assert state.draining
    assert [signum for signum, _ in server_handler_calls] == [signal.SIGINT]


def test_while_draining_readiness_is_503_but_predictions_are_served(model_path):
    app = create_app(make_settings(model_path))
    upload = encode(Image.new("L", (300, 300), 220), "PNG")
    with TestClient(app) as client:
        app.state.service.begin_draining()
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["error"] == {"code": "not_ready", "message": SHUTTING_DOWN}
        assert client.get("/health/live").status_code == 200
        assert client.post("/predict", files={"file": ("x.png", upload)}).status_code == 200
        assert client.get("/model").status_code == 200

        app.state.drain.close()  # the window is over
        late = client.post("/predict", files={"file": ("x.png", upload)})
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "shutting_down"
        assert late.headers["retry-after"] == str(app.state.settings.retry_after_s)
        assert late.headers["x-request-id"]
