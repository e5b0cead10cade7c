"""The HTTP contract through `with TestClient(app)` (the lifespan runs): every route, every
status code with the input that causes it, and the one error shape."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.schemas import DISCLAIMER
from app.main import create_app
from tests.support.testkit import CLASSES, encode, make_settings, xray_like

JPEG = "image/jpeg"


def flat(level: int, size: tuple[int, int] = (320, 300)) -> Image.Image:
    return Image.new("L", size, level)


def expected_p_pneumonia(level: int) -> float:
    """The tiny model on a uniform image: logits = m * [-4, 4] + [2, -2], m = level / 255."""
    m = level / 255
    logits = np.array([2 - 4 * m, -2 + 4 * m])
    return float(np.exp(logits[1]) / np.exp(logits).sum())


def assert_error(response, status: int, code: str, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]
    assert "Traceback" not in response.text


@pytest.fixture
def small_limit_client(model_path):
    settings = make_settings(model_path, max_upload_bytes=50_000)
    with TestClient(create_app(settings)) as client:
        yield client


# ---- the happy path ------------------------------------------------------------------------


def test_liveness_and_readiness_when_ready(client):
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["model"]["name"] == "tiny_cxr"
    assert ready.json()["execution_provider"] == "CPUExecutionProvider"


def test_health_probes_answer_head_requests(client, tmp_path):
    assert client.head("/health/live").status_code == 200
    assert client.head("/health/ready").status_code == 200
    with TestClient(create_app(make_settings(tmp_path / "absent.json"))) as not_ready:
        assert not_ready.head("/health/ready").status_code == 503


@pytest.mark.parametrize(("level", "label"), [(240, "PNEUMONIA"), (20, "NORMAL")])
def test_predict_multipart_returns_the_full_answer(client, level, label):
    response = client.post(
        "/predict", files={"file": ("chest.jpg", encode(flat(level), "PNG"), "image/png")}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == label
    assert list(body["probabilities"]) == CLASSES
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    # ORT's float32 ReduceMean over 50k pixels drifts ~1e-4 from the exact mean.
    expected = expected_p_pneumonia(level)
    assert body["probabilities"]["PNEUMONIA"] == pytest.approx(expected, abs=1e-3)
    assert body["threshold"] == 0.5
    assert body["model"]["name"] == "tiny_cxr"
    assert body["model"]["version"] == "0.0.1-test"
    assert re.fullmatch(r"[0-9a-f]{64}", body["model"]["sha256"])
    assert body["execution_provider"] == "CPUExecutionProvider"
    assert body["disclaimer"] == DISCLAIMER
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert response.headers["x-request-id"] == body["request_id"]
    timing = body["timing_ms"]
    assert timing["total"] >= timing["decode"] + timing["inference"] > 0


@pytest.mark.parametrize("content_type", [JPEG, "image/png", "application/octet-stream"])
def test_predict_raw_body_detects_the_format_from_bytes(client, content_type):
    # PNG bytes under every declared type, including the wrong one.
    data = encode(flat(240), "PNG")
    response = client.post("/predict", content=data, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "PNEUMONIA"


def test_file_name_and_declared_part_type_are_ignored(client):
    data = encode(xray_like((1200, 1000)).convert("RGB"), "JPEG", progressive=True)
    response = client.post("/predict", files={"file": ("scan.gif", data, "image/gif")})
    assert response.status_code == 200, response.text


def test_a_sane_incoming_request_id_is_echoed_and_a_hostile_one_replaced(client):
    data = encode(flat(100), "PNG")
    echoed = client.post(
        "/predict", content=data, headers={"content-type": JPEG, "x-request-id": "lb-7f3a.42"}
    )
    assert echoed.headers["x-request-id"] == "lb-7f3a.42"
    assert echoed.json()["request_id"] == "lb-7f3a.42"
    hostile = client.get("/health/live", headers={"x-request-id": "a" * 65 + "<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])


def test_model_endpoint_serves_the_metadata_contract(client):
    body = client.get("/model").json()
    assert body["classes"] == CLASSES
    assert body["input"] == {
        "name": "image",
        "shape": [None, 224, 224, 1],
        "dtype": "float32",
        "layout": "NHWC",
    }
    assert body["preprocessing"]["resize_filter"] == "bilinear"
    assert body["decision"] == {
        "threshold": 0.5,
        "positive_class": "PNEUMONIA",
        "target_sensitivity": None,
        "chosen_on": "validation",
    }
    assert body["calibration"]["temperature"] == 1.0
    assert body["metrics"] == {"test": {"auroc": 0.5}}
    assert body["provenance"]["note"].startswith("built by")
    assert body["execution_provider"] == "CPUExecutionProvider"


def test_openapi_declares_the_body_and_the_error_shape(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", JPEG, "application/dicom"} <= set(
        predict["requestBody"]["content"]
    )
    for status in ("413", "415", "422", "503"):
        schema = predict["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse")
    assert "research use only" in predict["description"].lower()
    assert client.get("/docs").status_code == 200


# ---- 413 -----------------------------------------------------------------------------------


def test_413_multipart_over_the_limit(small_limit_client):
    response = small_limit_client.post(
        "/predict", files={"file": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 60_000)}
    )
    assert_error(response, 413, "payload_too_large", "50000 bytes")


def test_413_raw_over_the_limit(small_limit_client):
    response = small_limit_client.post(
        "/predict", content=b"\xff\xd8\xff" + b"\0" * 60_000, headers={"content-type": JPEG}
    )
    assert_error(response, 413, "payload_too_large")


def test_413_chunked_body_without_content_length(small_limit_client):
    def chunks():
        yield b"\xff\xd8\xff"
        for _ in range(20):
            yield b"\0" * 4096

    response = small_limit_client.post("/predict", content=chunks(), headers={"content-type": JPEG})
    assert_error(response, 413, "payload_too_large")


def test_an_upload_just_under_the_limit_is_accepted(model_path):
    data = encode(xray_like((400, 400)), "PNG")
    settings = make_settings(model_path, max_upload_bytes=len(data))
    with TestClient(create_app(settings)) as client:
        assert (
            client.post("/predict", content=data, headers={"content-type": JPEG}).status_code == 200
        )
        multipart = client.post("/predict", files={"file": ("x.png", data)})
        assert multipart.status_code == 200


# ---- 415 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (encode(xray_like(), "GIF"), "GIF"),
        (encode(xray_like(), "BMP"), "BMP"),
        (b"just some text, not an X-ray", "unrecognised"),
        (b"", "empty"),
    ],
    ids=["gif", "bmp", "text", "empty"],
)
def test_415_for_formats_it_does_not_take(client, data, fragment):
    raw = client.post("/predict", content=data, headers={"content-type": "application/dicom"})
    assert_error(raw, 415, "unsupported_media_type", fragment)
    multipart = client.post("/predict", files={"file": ("upload", data)})
    assert_error(multipart, 415, "unsupported_media_type", fragment)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_415_for_a_request_content_type_it_does_not_take(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/predict", content=encode(flat(200), "PNG"), headers=headers)
    assert_error(response, 415, "unsupported_media_type", "multipart form field 'file'")


# ---- 422 -----------------------------------------------------------------------------------


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode(xray_like((500, 500)), "JPEG")[:3000], "invalid_image"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "invalid_image"),
        (encode(xray_like((40, 300)), "PNG"), "image_too_small"),
        (_bomb_png(), "image_too_many_pixels"),
    ],
    ids=["truncated-jpeg", "corrupt-jpeg", "tiny", "pixel-bomb"],
)
def test_422_for_bytes_that_do_not_make_a_usable_image(client, data, code):
    response = client.post("/predict", content=data, headers={"content-type": JPEG})
    assert_error(response, 422, code)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            b'--B\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--B--\r\n',
            "exactly one multipart field named 'file'",
        ),
        (b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc', "closing boundary"),
        (b"not multipart at all", "malformed multipart body"),
    ],
    ids=["no-file-field", "cut-off", "garbage"],
)
def test_422_for_malformed_multipart(client, body, fragment):
    response = client.post(
        "/predict", content=body, headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert_error(response, 422, "invalid_request", fragment)


def test_422_for_two_file_fields(client):
    data = encode(flat(200), "PNG")
    response = client.post("/predict", files=[("file", ("a.png", data)), ("file", ("b.png", data))])
    assert_error(response, 422, "invalid_request", "got 2")


# ---- 404 / 405 ------------------------------------------------------------------------------


def test_unknown_route_and_wrong_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    wrong_method = client.get("/predict")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


# ---- 503 -----------------------------------------------------------------------------------


def test_503_before_the_lifespan_has_loaded_the_model(model_path):
    client = TestClient(create_app(make_settings(model_path)))  # no `with`: no lifespan
    assert client.get("/health/live").status_code == 200
    assert_error(client.get("/health/ready"), 503, "not_ready", "model is loading")


def test_503_with_the_reason_when_the_model_is_missing(tmp_path):
    missing = tmp_path / "models" / "pneumonia_cxr.json"
    with TestClient(create_app(make_settings(missing))) as client:
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert_error(ready, 503, "not_ready", f"model metadata not found: {missing}")
        assert_error(client.get("/model"), 503, "not_ready")
        # Readiness is checked before the upload is even read.
        garbage = client.post("/predict", content=b"junk", headers={"content-type": JPEG})
        assert_error(garbage, 503, "not_ready", "model metadata not found")


def test_503_with_a_broken_model(write_model):
    path = write_model(sha256="0" * 64)
    with TestClient(create_app(make_settings(path))) as client:
        assert_error(client.get("/health/ready"), 503, "not_ready", "sha256 of tiny_cxr.onnx")
        data = encode(flat(200), "PNG")
        assert_error(client.post("/predict", files={"file": ("x.png", data)}), 503, "not_ready")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="needs a CPU-only onnxruntime"
)
def test_503_when_cuda_is_demanded_on_a_cpu_only_machine(model_path):
    with TestClient(create_app(make_settings(model_path, provider="cuda"))) as client:
        assert_error(client.get("/health/ready"), 503, "not_ready", "CXR_PROVIDER=cuda")
        assert client.get("/health/live").status_code == 200


def test_ready_turns_503_once_shutdown_begins(model_path):
    app = create_app(make_settings(model_path))
    with TestClient(app) as client:
        assert client.get("/health/ready").status_code == 200
    after = TestClient(app)  # the lifespan has exited; the app object is still addressable
    assert_error(after.get("/health/ready"), 503, "not_ready", "shutting down")
    with TestClient(app) as restarted:  # a new start-up does not inherit the draining flag
        assert restarted.get("/health/ready").status_code == 200


# ---- robustness ----------------------------------------------------------------------------


def test_unexpected_failures_are_a_500_in_the_error_shape_without_internals(model_path):
    app = create_app(make_settings(model_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        session = app.state.service.classifier._session
        real_run = session.run

        def explode(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        session.run = explode  # ONNX Runtime failing inside a batched model run
        response = client.post(
            "/predict", content=encode(flat(200), "PNG"), headers={"content-type": JPEG}
        )
        assert_error(response, 500, "internal_error")
        assert "secret" not in response.text
        session.run = real_run  # the failed batch failed its callers only; the service goes on
        after = client.post(
            "/predict", content=encode(flat(200), "PNG"), headers={"content-type": JPEG}
        )
        assert after.status_code == 200


def test_the_service_stays_ready_after_a_barrage_of_hostile_uploads(client):
    rng = np.random.default_rng(7)
    good = encode(xray_like((300, 300)), "JPEG")
    hostile = [
        rng.bytes(5000),
        b"\xff\xd8\xff" + rng.bytes(5000),
        b"\x89PNG\r\n\x1a\n" + rng.bytes(5000),
        good[: len(good) // 2],
        bytes(b ^ 0x55 for b in good),
        _bomb_png(),
        b"\0" * 128 + b"DICM",
    ]
    statuses = set()
    for data in hostile * 3:
        response = client.post("/predict", content=data, headers={"content-type": JPEG})
        statuses.add(response.status_code)
        assert response.json()["error"]["code"]
    assert statuses <= {415, 422}
    assert client.get("/health/ready").status_code == 200
    assert client.post("/predict", content=good, headers={"content-type": JPEG}).status_code == 200
