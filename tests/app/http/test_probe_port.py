"""The probe port's own HTTP server: a checker that resets its connection is routine."""

from __future__ import annotations

import logging

import pytest

from app.http.probes import ProbeAnswers, ProbeServer
from app.serving.state import ServiceState


def _fail_with(server: ProbeServer, error: BaseException) -> None:
    try:
        raise error
    except BaseException:  # as socketserver calls it: inside the handler's except
        server._server.handle_error(None, ("127.0.0.1", 1))


def test_a_reset_connection_leaves_no_traceback_and_other_errors_one_line(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    server = ProbeServer("127.0.0.1", 0, ServiceState, ProbeAnswers(10.0))
    try:
        with caplog.at_level(logging.WARNING, logger="app.http.probes"):
            for routine in (ConnectionResetError(), BrokenPipeError(), TimeoutError()):
                _fail_with(server, routine)
            assert not caplog.records
            _fail_with(server, ValueError("a bug"))
        (record,) = caplog.records
        assert record.fields == {"error": "ValueError"}  # type: ignore[attr-defined]
    finally:
        server._server.server_close()  # never started: nothing to shut down
    assert "Traceback" not in capfd.readouterr().err
