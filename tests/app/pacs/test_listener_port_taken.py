"""A C-STORE port that another process holds: the listener is off and says why (log, readiness,
`GET /model`); every HTTP upload is still answered (issue 27: `scripts/run.sh` asks for 11112,
which a PACS on the same machine may already use)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.http.probes import READY_PATH
from app.main import create_app
from app.testing import dicom_files as factory
from tests.support.testkit import encode, make_settings, xray_like


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket holds for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield int(holder.getsockname()[1])


def test_a_taken_dicom_port_leaves_the_http_api_serving(
    model_path: Path, tmp_path: Path, held_port: int
) -> None:
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        dicom_port=held_port,
        dicom_host="127.0.0.1",
        dicom_peers="*@127.0.0.1",
        log_level="INFO",
    )
    app = create_app(settings)
    # The ERROR record, kept by a handler of our own on the listener's logger, attached after the
    # service set up its logging (what reaches stderr or pytest's capture depends on the logging
    # set-up that earlier tests of the session left behind).
    records: list[logging.LogRecord] = []
    keeper = logging.Handler(logging.ERROR)
    keeper.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("app.pacs.pipeline").addHandler(keeper)
    try:
        with TestClient(app) as client:
            _check_served_and_reported(client, held_port, records)
    finally:
        logging.getLogger("app.pacs.pipeline").removeHandler(keeper)


def _check_served_and_reported(
    client: TestClient, held_port: int, records: list[logging.LogRecord]
) -> None:
    jpeg = client.post(
        "/predict", content=encode(xray_like(), "JPEG"), headers={"Content-Type": "image/jpeg"}
    )
    assert jpeg.status_code == 200, jpeg.text
    assert set(jpeg.json()["probabilities"]) == {"NORMAL", "PNEUMONIA"}
    dicom = factory.encode_dataset(factory.make_dataset(factory.ramp(64, 64)), "explicit_le")
    upload = client.post("/predict", content=dicom, headers={"Content-Type": "application/dicom"})
    assert upload.status_code == 200, upload.text

    ready = client.get("/health/ready")
    assert ready.status_code == 200
    down = ready.json()["dicom_listener_down"]
    assert f"127.0.0.1:{held_port}" in down and "CXR_DICOM_PORT" in down
    assert "in use" in down  # the operating system's reason, not a guess
    assert client.get("/model").json()["dicom_listener_down"] == down
    # The probe port's answer (`CXR_PROBE_PORT`) is the same readiness.
    state = client.app.state  # type: ignore[attr-defined]
    status, body = state.probe_answers.answer(state.service, READY_PATH)
    assert status == 200 and json.loads(body)["dicom_listener_down"] == down
    # Loud: an ERROR record with the reason.
    (logged,) = [r for r in records if r.getMessage() == "dicom listener not started"]
    assert logged.levelname == "ERROR" and logged.fields["reason"] == down  # type: ignore[attr-defined]


def test_a_free_dicom_port_is_not_reported_down(model_path: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free = int(probe.getsockname()[1])
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        dicom_port=free,
        dicom_host="127.0.0.1",
        dicom_peers="*@127.0.0.1",
    )
    with TestClient(create_app(settings)) as client:
        assert "dicom_listener_down" not in client.get("/health/ready").json()
        assert "dicom_listener_down" not in client.get("/model").json()
