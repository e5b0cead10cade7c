"""Keys with roles (issue 26, items 5 and 6): read, predict, deliver, operate, named per line of
the key file; a line without roles, and CXR_API_KEYS, keep what every key could do before
(read, predict, deliver) and never operate. `DELETE /results/{uid}` needs an operator key; the
results store is bounded (503 `results_store_full`) and, with no destination configured, purged
after the retention. Against the whole app with its lifespan (the tiny model, a SQLite outbox)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.http.auth import ApiKeyConfigError
from app.main import create_app
from app.testing import dicom_files as factory
from tests.app.pacs.intake_tools import instance, unique_uid
from tests.support.testkit import encode, make_settings, xray_like

VIEWER = "viewer-key-0123456789abcdef"
PREDICTOR = "predictor-key-0123456789abc"
LEGACY = "legacy-key-0123456789abcdef"  # a line without roles: the defaults
OPERATOR = "operator-key-0123456789abcd"
BOUNDARY = "key-roles-boundary"


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys.sha256"
    path.write_text(
        f"{sha256_hex(VIEWER)}  ward-viewer  roles=read\n"
        f"{sha256_hex(PREDICTOR)}  teaching  roles=predict\n"
        f"{sha256_hex(LEGACY)}  -\n"
        f"{sha256_hex(OPERATOR)}  on-call roles=operate,read  # rotated 2026-12\n"
    )
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def dicom(index: int) -> bytes:
    stored = (factory.ramp(96, 96).astype(np.float64) * (0.3 + index / 50)).astype(np.uint16)
    return instance(sop_instance_uid=unique_uid(26, 5, index), stored=stored)


def deliver(client: TestClient, data: bytes, key: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/dicom", **(auth(key) if key else {})}
    return client.post("/predict", params={"deliver": "true"}, content=data, headers=headers)


def stow(client: TestClient, data: bytes, key: str | None = None) -> httpx.Response:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    headers = {"content-type": content_type, **(auth(key) if key else {})}
    return client.post("/dicomweb/studies", content=body, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"], error


@pytest.fixture
def keyed(model_path: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(
        model_path, state_dir=tmp_path / "state", api_keys_file=key_file(tmp_path)
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_each_role_opens_its_routes_and_no_other(keyed: TestClient) -> None:
    jpeg = encode(xray_like(), "JPEG")
    plain = {"content-type": "image/jpeg"}
    source = dicom(1)
    uid = unique_uid(26, 5, 1)
    # a viewer reads, and nothing else
    viewer_predict = keyed.post("/predict", content=jpeg, headers={**plain, **auth(VIEWER)})
    assert_error(viewer_predict, 403, "forbidden", "`predict` role")
    assert_error(deliver(keyed, source, VIEWER), 403, "forbidden", "`predict` role")
    assert_error(stow(keyed, source, VIEWER), 403, "forbidden", "`deliver` role")
    assert_error(keyed.get(f"/results/{uid}", headers=auth(VIEWER)), 404, "result_not_found", "")
    # a predictor predicts, and cannot write into the PACS nor read stored results
    answer = keyed.post("/predict", content=jpeg, headers={**plain, **auth(PREDICTOR)})
    assert answer.status_code == 200, answer.text
    assert_error(deliver(keyed, source, PREDICTOR), 403, "forbidden", "`deliver` role")
    assert_error(keyed.get(f"/results/{uid}", headers=auth(PREDICTOR)), 403, "forbidden", "read")
    # a key without roles= does what every key did before roles: predict, deliver, read
    delivered = deliver(keyed, source, LEGACY)
    assert delivered.status_code == 200, delivered.text
    assert keyed.get(f"/results/{uid}", headers=auth(LEGACY)).status_code == 200
    assert keyed.get(f"/results/{uid}", headers=auth(VIEWER)).status_code == 200
    assert stow(keyed, dicom(2), LEGACY).status_code == 200
    # ... but not delete: that is the operator's
    legacy_delete = keyed.delete(f"/results/{uid}", headers=auth(LEGACY))
    assert_error(legacy_delete, 403, "forbidden", "`operate` role")
    # every key reads the model's metadata; a wrong key is still a 401
    for key in (VIEWER, PREDICTOR, LEGACY, OPERATOR):
        assert keyed.get("/model", headers=auth(key)).status_code == 200
    assert keyed.delete(f"/results/{uid}", headers=auth("not-a-key-0123456789")).status_code == 401


def test_an_operator_deletes_a_result_and_its_objects(keyed: TestClient) -> None:
    uid = unique_uid(26, 5, 3)
    delivered = deliver(keyed, dicom(3), LEGACY)
    assert delivered.status_code == 200, delivered.text
    objects = sorted(o["sop_instance_uid"] for o in delivered.json()["result"]["objects"])
    removed = keyed.delete(f"/results/{uid}", headers=auth(OPERATOR))
    assert removed.status_code == 200, removed.text
    assert removed.json() == {
        "sop_instance_uid": uid,
        "results_removed": 1,
        "objects_removed": objects,
    }
    assert_error(keyed.get(f"/results/{uid}", headers=auth(OPERATOR)), 404, "result_not_found", "")
    for sr in objects:  # by a result object's UID too
        assert keyed.get(f"/results/{sr}", headers=auth(OPERATOR)).status_code == 404
    again = keyed.delete(f"/results/{uid}", headers=auth(OPERATOR))
    assert_error(again, 404, "result_not_found", "no result")
    not_a_uid = keyed.delete("/results/not-a-uid", headers=auth(OPERATOR))
    assert_error(not_a_uid, 422, "invalid_request", "sop_instance_uid")


def test_without_keys_nothing_can_delete(model_path: Path, tmp_path: Path) -> None:
    settings = make_settings(model_path, state_dir=tmp_path / "state")
    uid = unique_uid(26, 5, 4)
    with TestClient(create_app(settings)) as client:
        assert deliver(client, dicom(4)).status_code == 200
        refused = client.delete(f"/results/{uid}")
        assert_error(refused, 403, "forbidden", "roles=operate")
        assert client.get(f"/results/{uid}").status_code == 200


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (f"{sha256_hex(VIEWER)}  roles=read,admin", "line 1: roles= takes one or more of"),
        (f"{sha256_hex(VIEWER)}  roles=", "line 1: roles= takes one or more of"),
        (f"{sha256_hex(VIEWER)}  roles=read roles=operate", "more than one roles= field"),
    ],
)
def test_a_bad_roles_field_stops_the_start(
    model_path: Path, tmp_path: Path, line: str, fragment: str
) -> None:
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    with pytest.raises(ApiKeyConfigError, match=fragment):
        create_app(make_settings(model_path, api_keys_file=path))


def test_a_full_results_store_answers_503_in_the_error_shape(
    model_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(model_path, state_dir=tmp_path / "state", results_max_stored=1)
    with TestClient(create_app(settings)) as client:
        first = dicom(5)
        assert deliver(client, first).status_code == 200
        assert deliver(client, first).status_code == 200  # the same image: the stored result
        full = deliver(client, dicom(6))
        assert_error(full, 503, "results_store_full", "CXR_RESULTS_MAX_STORED")
        assert full.headers["Retry-After"] == "1"
        refused = stow(client, dicom(7))
        assert_error(refused, 503, "results_store_full", "CXR_RESULTS_MAX_STORED")
        assert client.get(f"/results/{unique_uid(26, 5, 6)}").status_code == 404


def test_results_are_purged_after_the_retention_with_no_destination(
    model_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(model_path, state_dir=tmp_path / "state", results_retention_s=2.0)
    uid = unique_uid(26, 5, 8)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        assert deliver(client, dicom(8)).status_code == 200
        answer: Any = client.get(f"/results/{uid}")
        assert answer.status_code == 200  # no destination: kept, readable
        while answer.status_code == 200 and time.monotonic() - started < 15:
            time.sleep(0.2)
            answer = client.get(f"/results/{uid}")
        assert answer.status_code == 404
        # gone after the retention (2 s) plus at most a sweep interval (a tenth of it)
        assert 2.0 <= time.monotonic() - started < 6.0
