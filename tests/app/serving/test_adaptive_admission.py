"""The adaptive image limit (CoDel-like, on the time images hold their slots) and readiness that
turns 503 when work in flight stops finishing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.serving.admission import AdaptiveLimit, Admission
from tests.app.serving.test_overload import HeldModel
from tests.support.testkit import encode, make_settings, xray_like

JPEG = {"content-type": "image/jpeg"}


def test_the_limit_shrinks_on_a_standing_queue_and_grows_back_when_it_holds_uploads_back() -> None:
    limit = AdaptiveLimit(ceiling=48, floor=6, target_s=0.1, interval_s=0.5)
    now = 0.0
    # Every image held its slot for 0.4 s: a standing queue, interval after interval.
    for _ in range(40):
        now += 0.25
        limit.observe(0.4, now)
    assert limit.limit == 6  # 48 -> 43 -> 38 -> ... never below the floor
    # One short sojourn in an interval says there is no standing queue; no refusals: no change.
    for _ in range(4):
        now += 0.25
        limit.observe(0.05, now)
    assert limit.limit == 6
    # Refusals while the queue is short: the limit was what held uploads back.
    for _ in range(200):
        limit.refused()
        now += 0.25
        limit.observe(0.05, now)
    assert limit.limit == 48  # back to the ceiling, never past it


def test_admission_applies_the_adaptive_limit() -> None:
    adaptive = AdaptiveLimit(ceiling=10, floor=2, target_s=0.001, interval_s=0.0)
    admission = Admission(max_images=10, max_upload_bytes=1_000, retry_after_s=1, adaptive=adaptive)
    for _ in range(3):
        with admission.admit(1, 0):
            time.sleep(0.01)  # held 10 ms, above the 1 ms target
    assert admission.max_images < 10
    with admission.admit(admission.max_images, 0):
        assert admission.refusal() is not None  # the lower limit is the one enforced


def test_readiness_turns_503_while_work_in_flight_stops_finishing(model_path: Path) -> None:
    # The stall window leaves a loaded CI machine a second between the image taking its slot and
    # the first probe (0.3 s was once not enough there).
    app = create_app(make_settings(model_path, ready_stall_s=1.0))
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        held = HeldModel(app.state.service.classifier._session)
        upload = pool.submit(
            client.post, "/predict", content=encode(xray_like(), "PNG"), headers=JPEG
        )
        assert held.busy.wait(5)
        assert client.get("/health/ready").status_code == 200  # busy, not yet stalled
        time.sleep(1.2)
        stalled = client.get("/health/ready")
        assert stalled.status_code == 503
        assert stalled.json()["error"]["message"].startswith("stalled: 1 images in flight")
        assert "cxr_ready 0.0" in client.get("/metrics").text
        held.gate.set()
        assert upload.result(10).status_code == 200
        assert client.get("/health/ready").status_code == 200
        assert client.get("/health/live").status_code == 200  # alive throughout
