"""Hostile DICOM over HTTP (in-process, `TestClient`): every upload is answered in the one JSON
error shape with a 4xx or predicted, in `/predict` and in each part of `/predict/batch`, where the
other parts keep their answers. Also: a bug in one batch part is that part's 500 alone, and the
OpenAPI document states the batch's file count and `explain_class`'s values."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.errors import ServiceError
from app.main import create_app
from app.model.classifier import Classifier
from app.testing.dicom_files import make_dicom, ramp
from app.testing.fuzz import mutants, seed_files
from tests.app.imaging.test_robustness import (
    regression_mutants,
    sop_instance_uid_vr_corrupted,
    transfer_syntax_digit_changed,
)
from tests.support.testkit import make_settings

DICOM = {"content-type": "application/dicom"}
FUZZ_SEED = 77
SINGLE_MUTANTS = 500
BATCHES, PARTS = 100, 10


def dicom_part(data: bytes, index: int = 0) -> tuple[str, tuple[str, bytes, str]]:
    return ("file", (f"{index}.dcm", data, "application/dicom"))


def assert_error_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], body


def test_the_two_one_byte_reproductions_are_422_in_the_error_shape(client: TestClient) -> None:
    for data in (transfer_syntax_digit_changed(), sop_instance_uid_vr_corrupted()):
        response = client.post("/predict", content=data, headers=DICOM)
        assert response.status_code == 422, response.text
        assert_error_shape(response.json())
        assert response.json()["error"]["code"] == "invalid_image"


def test_one_hostile_part_fails_alone_and_the_others_are_answered(client: TestClient) -> None:
    good = make_dicom(ramp())
    parts = [good, transfer_syntax_digit_changed(), good, sop_instance_uid_vr_corrupted(), good]
    response = client.post("/predict/batch", files=[dicom_part(p, i) for i, p in enumerate(parts)])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 422, 200, 422, 200]
    assert [r["error"]["code"] for r in results if r["error"]] == ["invalid_image"] * 2
    assert all(r["prediction"]["dicom"]["sop_instance_uid"] for r in results if r["prediction"])


def test_every_regression_file_is_a_422_over_http(client: TestClient) -> None:
    cases = regression_mutants()
    assert len(cases) >= 20
    for name, data in cases:
        response = client.post("/predict", content=data, headers=DICOM)
        assert response.status_code == 422, (name, response.text)
        assert_error_shape(response.json())
    batch = client.post("/predict/batch", files=[dicom_part(data) for _, data in cases[:16]])
    assert batch.status_code == 200
    assert {r["status"] for r in batch.json()["results"]} == {422}


def test_bounded_fuzz_through_the_http_app(client: TestClient) -> None:
    """500 mutants to `/predict` and 100 batches of 10 fuzzed parts: no 5xx anywhere, errors in
    the one shape, and a batch answers each of its parts."""
    seeds = seed_files()
    started = time.perf_counter()
    statuses: collections.Counter[int] = collections.Counter()
    for made in mutants(seeds, FUZZ_SEED, SINGLE_MUTANTS):
        response = client.post("/predict", content=made.data, headers=DICOM)
        assert response.status_code < 500, (made.id, made.operators, response.text)
        statuses[response.status_code] += 1
        if response.status_code != 200:
            assert_error_shape(response.json())
    part_statuses: collections.Counter[int] = collections.Counter()
    for batch in range(BATCHES):
        made = list(mutants(seeds, FUZZ_SEED + 1, PARTS, start=batch * PARTS))
        response = client.post("/predict/batch", files=[dicom_part(m.data) for m in made])
        assert response.status_code == 200, ([m.id for m in made], response.text)
        results = response.json()["results"]
        assert [r["index"] for r in results] == list(range(PARTS))
        for item, mutant_ in zip(results, made, strict=True):
            assert item["status"] < 500, (mutant_.id, mutant_.operators, item)
            part_statuses[item["status"]] += 1
    assert statuses[200] > 20 and statuses[422] > 100, statuses
    assert part_statuses[200] > 30 and part_statuses[422] > 150, part_statuses
    assert time.perf_counter() - started < 120


def test_a_bug_in_one_batch_part_is_that_parts_500_only(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not an image problem (those are 4xx): a defect in the service itself, for one part."""
    bug = make_dicom(ramp(), view="AP")
    prepare = Classifier.prepare

    def sometimes_broken(self: Classifier, upload: Any) -> Any:
        prepared = prepare(self, upload)
        if prepared.dicom is not None and prepared.dicom.view_position == "AP":
            raise RuntimeError("a defect")
        return prepared

    monkeypatch.setattr(Classifier, "prepare", sometimes_broken)
    good = make_dicom(ramp())
    response = client.post("/predict/batch", files=[dicom_part(p) for p in (good, bug, good)])
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 500, 200]
    assert results[1]["error"] == {"code": "internal_error", "message": "internal server error"}
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
    # and the connection is still good for the next request
    assert client.post("/predict", content=good, headers=DICOM).status_code == 200


def test_a_500_on_predict_says_connection_close(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Classifier, upload: Any) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr(Classifier, "prepare", broken)
    # The server's exception is re-raised by Starlette after the answer is sent: do not let the
    # test client turn it into a test error.
    with TestClient(client.app, raise_server_exceptions=False) as plain:
        response = plain.post("/predict", content=make_dicom(ramp()), headers=DICOM)
    assert response.status_code == 500
    assert response.headers["connection"] == "close"
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"}
    }


def test_a_404_keeps_the_connection(client: TestClient) -> None:
    assert "connection" not in client.get("/nowhere").headers


# -- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_states_the_batch_file_count_from_the_settings(model_path: Path) -> None:
    with TestClient(create_app(make_settings(model_path, max_images_per_request=5))) as client:
        document = client.get("/openapi.json").json()
        too_many = client.post(
            "/predict/batch", files=[dicom_part(make_dicom(ramp()), i) for i in range(6)]
        )
    body = document["paths"]["/predict/batch"]["post"]["requestBody"]
    files = body["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    assert (files["minItems"], files["maxItems"]) == (1, 5)
    assert too_many.status_code == 422  # what the document says is what the service does


def test_openapi_lists_the_served_models_classes_for_explain_class(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    [parameter] = [
        p
        for p in document["paths"]["/predict"]["post"]["parameters"]
        if p["name"] == "explain_class"
    ]
    classes = client.get("/model").json()["classes"]
    assert classes == ["NORMAL", "PNEUMONIA"]
    [string] = [s for s in parameter["schema"]["anyOf"] if s.get("type") == "string"]
    assert string["enum"] == classes
    # a value outside the enum is refused, as documented
    refused = client.post(
        "/predict?explain_class=EFFUSION", content=make_dicom(ramp()), headers=DICOM
    )
    assert refused.status_code == 422
    # twice: the hook edits FastAPI's cached document idempotently
    assert client.get("/openapi.json").json() == document


def test_openapi_has_no_enum_before_a_model_is_loaded(model_path: Path) -> None:
    app = create_app(make_settings(model_path))
    document = app.openapi()  # no lifespan ran: no model
    [parameter] = [
        p
        for p in document["paths"]["/predict"]["post"]["parameters"]
        if p["name"] == "explain_class"
    ]
    assert all("enum" not in s for s in parameter["schema"]["anyOf"])
    assert "GET /model" in parameter["description"]


def test_service_errors_from_imaging_are_never_500() -> None:
    """The imaging stage's errors are all client errors (its boundary only makes 4xx)."""
    from app.errors import InvalidImage

    assert issubclass(InvalidImage, ServiceError) and 400 <= InvalidImage.status_code < 500
