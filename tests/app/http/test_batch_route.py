"""POST /predict/batch: one result per image, in order, each with its own status."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.support.testkit import encode, make_settings, xray_like


def part(data: bytes, name: str = "x.png", media: str = "image/png"):  # type: ignore[no-untyped-def]
    return ("file", (name, data, media))


def test_results_come_back_in_order_with_their_own_status(client) -> None:
    bright = encode(Image.new("L", (300, 300), 240), "PNG")
    dark = encode(Image.new("L", (300, 300), 15), "JPEG")
    files = [
        part(bright),
        part(b"not an image at all"),
        part(dark, "d.jpg", "image/jpeg"),
        part(encode(Image.new("L", (20, 20), 100), "PNG")),
        part(bright[: len(bright) // 2]),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in results] == [200, 415, 200, 422, 422]
    assert results[0]["prediction"]["label"] == "PNEUMONIA"
    assert results[2]["prediction"]["label"] == "NORMAL"
    assert results[1]["error"]["code"] == "unsupported_media_type"
    assert results[3]["error"]["code"] == "image_too_small"
    assert results[4]["error"]["code"] == "invalid_image"
    assert results[1]["prediction"] is None and results[0]["error"] is None
    assert body["model"]["name"] == "tiny_cxr"
    assert results[0]["prediction"]["request_id"] == body["request_id"]


def test_each_answer_equals_the_single_image_route(client) -> None:
    images = [encode(xray_like(level=level), "PNG") for level in (30, 120, 250)]
    batch = client.post("/predict/batch", files=[part(i) for i in images]).json()["results"]
    for data, item in zip(images, batch, strict=True):
        single = client.post("/predict", content=data, headers={"content-type": "image/png"})
        # The tiny model's float32 ReduceMean over 50k pixels is summed in another order for a
        # batch (~1e-5); the shipped model's batched answers are held to 1e-5 on real images.
        assert item["prediction"]["probabilities"] == pytest.approx(
            single.json()["probabilities"], abs=1e-4
        )
        assert item["prediction"]["label"] == single.json()["label"]


def test_image_count_is_limited_per_request(model_path) -> None:
    image = encode(xray_like(), "PNG")
    with TestClient(create_app(make_settings(model_path, max_images_per_request=3))) as client:
        assert client.post("/predict/batch", files=[part(image)] * 3).status_code == 200
        too_many = client.post("/predict/batch", files=[part(image)] * 4)
        assert too_many.status_code == 422
        assert "1 to 3" in too_many.json()["error"]["message"]
        none = client.post("/predict/batch", files=[("other", ("a.txt", b"x", "text/plain"))])
        assert none.status_code == 422


def test_the_whole_body_is_bounded_not_each_part(model_path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (600, 600), dtype=np.uint8)
    image = encode(Image.fromarray(noise), "PNG")  # 360 KB: the multipart envelope is noise
    limit = int(len(image) * 2.5)
    with TestClient(create_app(make_settings(model_path, max_upload_bytes=limit))) as client:
        assert client.post("/predict/batch", files=[part(image)] * 2).status_code == 200
        response = client.post("/predict/batch", files=[part(image)] * 3)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_a_raw_body_is_refused_with_415(client) -> None:
    response = client.post(
        "/predict/batch", content=encode(xray_like(), "PNG"), headers={"content-type": "image/png"}
    )
    assert response.status_code == 415


def test_the_batch_route_is_documented_in_openapi(client) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/predict/batch"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["file"]["type"] == "array"
    assert {"200", "413", "415", "422", "429", "503"} <= set(operation["responses"])
    assert "429" in spec["paths"]["/predict"]["post"]["responses"]
