"""Readiness turns 503 the moment a termination signal arrives, before uvicorn starts draining."""

from __future__ import annotations

import signal

from app.main import _flip_readiness_on_signals
from app.readiness import SHUTTING_DOWN, ServiceState


def test_sigterm_flips_readiness_then_calls_the_servers_handler() -> None:
    received: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        state = ServiceState()
        state.failure = "pretend ready"
        _flip_readiness_on_signals(state)
        assert not state.draining
        signal.raise_signal(signal.SIGTERM)
        assert state.draining
        assert state.not_ready_reason == SHUTTING_DOWN
        assert received == [signal.SIGTERM]  # uvicorn's own handler still runs
    finally:
        signal.signal(signal.SIGTERM, original)
