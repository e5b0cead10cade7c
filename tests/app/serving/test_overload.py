"""Overload: admission refuses at once with 429 and Retry-After, deadlines drop stale work with 503,
the decode memory budget serialises large decodes, and the service stays ready through it all."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app.errors import Overloaded
from app.main import create_app
from app.serving.admission import Admission, DecodeBudget
from tests.support.testkit import encode, make_settings, xray_like

JPEG = {"content-type": "image/jpeg"}


# ---- the gates on their own -----------------------------------------------------------------


def test_admission_counts_images_and_refuses_past_the_limit() -> None:
    admission = Admission(max_images=3, max_upload_bytes=10_000, retry_after_s=2)
    with admission.admit(2, 100) as ticket:
        assert (admission.images, admission.upload_bytes) == (2, 100)
        with pytest.raises(Overloaded) as refused:
            ticket.grow(2)
        assert refused.value.retry_after_s == 2
        assert admission.images == 2  # a refused growth takes nothing
        ticket.grow(1)
        with pytest.raises(Overloaded), admission.admit(1, 1):
            pass
    assert (admission.images, admission.upload_bytes) == (0, 0)  # everything given back


def test_admission_bounds_upload_bytes_but_always_takes_one_request() -> None:
    admission = Admission(max_images=100, max_upload_bytes=1_000, retry_after_s=1)
    # larger than the budget, but nothing else is in flight: taken; then nothing more is
    with (
        admission.admit(1, 5_000),
        pytest.raises(Overloaded, match="bytes"),
        admission.admit(1, 10),
    ):
        pass
    with admission.admit(1, 600), pytest.raises(Overloaded), admission.admit(1, 600):
        pass


def test_admission_is_released_when_the_work_fails() -> None:
    admission = Admission(max_images=1, max_upload_bytes=1_000, retry_after_s=1)
    with pytest.raises(ValueError), admission.admit(1, 10):
        raise ValueError("decode failed")
    with admission.admit(1, 10):
        assert admission.images == 1


def test_decode_budget_makes_a_large_decode_wait_for_room() -> None:
    budget = DecodeBudget(capacity_bytes=100)
    order: list[str] = []
    entered = threading.Event()

    def big() -> None:
        with budget.hold(80):
            order.append("big")

    with budget.hold(60):
        worker = threading.Thread(target=big)
        worker.start()
        time.sleep(0.1)
        assert order == []  # 60 + 80 > 100: it waits
        assert budget.reserved_bytes == 60
        order.append("small done")
    worker.join(5)
    assert order == ["small done", "big"]
    assert budget.reserved_bytes == 0
    with budget.hold(10_000):  # more than the whole budget still runs, alone
        entered.set()
        assert budget.reserved_bytes == 100
    assert entered.is_set()


# ---- over HTTP ------------------------------------------------------------------------------


class HeldModel:
    """Wraps the ONNX session's `run` so a test can hold the model busy."""

    def __init__(self, session) -> None:  # type: ignore[no-untyped-def]
        self.real_run = session.run
        self.gate = threading.Event()
        self.busy = threading.Event()
        session.run = self.run

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.busy.set()
        self.gate.wait(10)
        return self.real_run(*args, **kwargs)


def test_a_full_service_answers_429_with_retry_after_at_once_and_stays_ready(model_path) -> None:
    settings = make_settings(
        model_path, max_in_flight_images=2, retry_after_s=3, max_upload_bytes=50_000
    )
    app = create_app(settings)
    image = encode(xray_like(), "PNG")
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        held = HeldModel(app.state.service.classifier._session)
        first = [pool.submit(client.post, "/predict", content=image, headers=JPEG) for _ in "ab"]
        assert held.busy.wait(5)
        # Both hold their slots (each takes it once its body has arrived): the service is full.
        admission = app.state.service.step.admission
        deadline = time.monotonic() + 5
        while admission.images < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        refused = client.post("/predict", content=image, headers=JPEG)
        refusal_seconds = time.perf_counter() - started
        # An upload that could never be taken gets its 413, full service or not.
        oversize = client.post("/predict", content=b"\xff\xd8\xff" * 20_000, headers=JPEG)
        assert client.get("/health/ready").status_code == 200  # full is not unready
        metrics = client.get("/metrics").text
        held.gate.set()
        assert [f.result(10).status_code for f in first] == [200, 200]
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "overloaded"
    assert refusal_seconds < 1.0
    assert oversize.status_code == 413
    assert "cxr_in_flight_images 2.0" in metrics


def test_a_multi_image_request_past_the_limit_is_refused_whole(model_path) -> None:
    settings = make_settings(model_path, max_in_flight_images=3)
    image = encode(xray_like(), "PNG")
    with TestClient(create_app(settings)) as client:
        files = [("file", (f"{i}.png", image, "image/png")) for i in range(4)]
        response = client.post("/predict/batch", files=files)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        ok = client.post("/predict/batch", files=files[:3])
        assert ok.status_code == 200
        assert [item["status"] for item in ok.json()["results"]] == [200, 200, 200]


def test_a_request_whose_deadline_passes_in_the_queue_gets_503_with_retry_after(model_path):
    app = create_app(make_settings(model_path))
    image = encode(xray_like(), "PNG")
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        held = HeldModel(app.state.service.classifier._session)
        first = pool.submit(client.post, "/predict", content=image, headers=JPEG)
        assert held.busy.wait(5)
        late = pool.submit(
            client.post,
            "/predict",
            content=image,
            headers={**JPEG, "X-Request-Timeout-Ms": "50"},
        )
        time.sleep(0.3)
        held.gate.set()
        assert first.result(10).status_code == 200
        response = late.result(10)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1.5"])
def test_a_malformed_timeout_header_is_a_422(client, value) -> None:
    image = encode(xray_like(), "PNG")
    response = client.post(
        "/predict", content=image, headers={**JPEG, "X-Request-Timeout-Ms": value}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_a_generous_timeout_changes_nothing(client) -> None:
    image = encode(xray_like(), "PNG")
    response = client.post(
        "/predict", content=image, headers={**JPEG, "X-Request-Timeout-Ms": "60000"}
    )
    assert response.status_code == 200
