"""API keys: off by default; when configured, /predict and /model need one (bearer or
X-API-Key), health probes and the docs stay open, failures are a 401 in the JSON error shape,
comparison never stops early, and keys reach neither the logs nor error messages."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http import auth
from app.http.auth import ApiKeyConfigError, ApiKeys
from app.main import create_app
from app.settings import Settings
from tests.support.testkit import UvicornProcess, encode, make_settings, process_settings

KEY_A = "alpha-key-0123456789abcdef"
KEY_B = "bravo-key-fedcba9876543210"
UPLOAD = encode(Image.new("L", (300, 300), 220), "PNG")


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def predict(client: TestClient, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/predict", files={"file": ("x.png", UPLOAD)}, headers=headers or {})


def assert_401(response: httpx.Response, fragment: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert fragment in response.json()["error"]["message"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY_A not in response.text and KEY_B not in response.text


@pytest.fixture
def keyed_client(model_path: Path):
    with TestClient(create_app(make_settings(model_path, api_keys=f"{KEY_A}, {KEY_B}"))) as c:
        yield c


def test_without_keys_everything_is_open_and_the_openapi_has_no_security(client):
    assert predict(client).status_code == 200
    assert client.get("/model").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "security" not in schema["paths"]["/predict"]["post"]
    assert "401" not in schema["paths"]["/predict"]["post"]["responses"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": f"bearer {KEY_B}"},
        {"X-API-Key": KEY_A},
        {"X-API-Key": KEY_B, "Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_a_configured_key_in_either_header_is_accepted(keyed_client, headers):
    response = predict(keyed_client, headers)
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "PNEUMONIA"
    assert keyed_client.get("/model", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/predict", "/model"])
def test_no_key_is_a_401_in_the_error_shape(keyed_client, path):
    response = keyed_client.request("POST" if path == "/predict" else "GET", path)
    assert_401(response, "an API key is required")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer not-a-configured-key-at-all"},
        {"X-API-Key": KEY_A[:-1]},
        {"X-API-Key": KEY_A + "x"},
        {"Authorization": f"Basic {KEY_A}"},  # right key, wrong scheme
        {"X-API-Key": sha256_hex(KEY_A)},  # the digest is not the key
    ],
)
def test_a_wrong_key_is_a_401(keyed_client, headers):
    response = predict(keyed_client, headers)
    if "Basic" in headers.get("Authorization", ""):
        assert_401(response, "an API key is required")
    else:
        assert_401(response, "the API key is not valid")


def test_health_probes_and_docs_stay_open(keyed_client):
    assert keyed_client.get("/health/live").status_code == 200
    assert keyed_client.get("/health/ready").status_code == 200
    assert keyed_client.head("/health/ready").status_code == 200
    assert keyed_client.get("/openapi.json").status_code == 200
    assert keyed_client.get("/docs").status_code == 200


def test_the_key_is_checked_before_anything_else(tmp_path):
    settings = make_settings(tmp_path / "absent.json", api_keys=KEY_A)
    with TestClient(create_app(settings)) as client:
        assert_401(predict(client), "an API key is required")  # not 503: no hint without a key
        ok = predict(client, {"X-API-Key": KEY_A})
        assert ok.status_code == 503 and ok.json()["error"]["code"] == "not_ready"


def test_openapi_declares_both_schemes_on_the_protected_operations_only(keyed_client):
    schema = keyed_client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>` with one of the configured API keys.",
    }
    assert schemes["api_key"]["type"] == "apiKey"
    assert schemes["api_key"]["in"] == "header" and schemes["api_key"]["name"] == "X-API-Key"
    for path, method in [("/predict", "post"), ("/model", "get")]:
        operation = schema["paths"][path][method]
        assert operation["security"] == [{"bearer": []}, {"api_key": []}]
        assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    for path in ["/health/live", "/health/ready"]:
        assert "security" not in schema["paths"][path]["get"]


def test_every_configured_digest_is_compared_even_after_a_match(monkeypatch):
    configured = [KEY_A, KEY_B, "c" * 20, "d" * 20]
    keys = ApiKeys({auth.key_digest(k): auth.DEFAULT_ROLES for k in configured})
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key in configured:  # whichever position the matching digest has in the set
        calls.clear()
        assert keys.accepts(key)
        assert len(calls) == 4
        assert all(a == auth.key_digest(key) for a, _ in calls)
    calls.clear()
    assert not keys.accepts("x" * 20)
    assert len(calls) == 4


def test_keys_come_from_the_environment_comma_separated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_API_KEYS", f" {KEY_A} ,{KEY_B},, ")
    settings = Settings()
    keys = ApiKeys.from_settings(settings)
    assert len(keys) == 2 and keys.accepts(KEY_A) and keys.accepts(KEY_B)
    assert KEY_A not in repr(settings) and KEY_A not in str(settings.model_dump())
    monkeypatch.setenv("CXR_API_KEYS", "")
    assert not ApiKeys.from_settings(Settings()).required


def test_a_file_of_sha256_digests(tmp_path, model_path):
    key_file = tmp_path / "api-keys.sha256"
    key_file.write_text(
        "# clients of the screening API\n"
        f"{sha256_hex(KEY_A)}  -\n"
        "\n"
        f"{sha256_hex(KEY_B).upper()}  radiology-worklist   # rotated 2025-01\n"
    )
    settings = make_settings(model_path, api_keys_file=key_file)
    with TestClient(create_app(settings)) as client:
        assert predict(client, {"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        assert predict(client, {"X-API-Key": KEY_B}).status_code == 200
        assert_401(predict(client, {"X-API-Key": "some-other-key-entirely"}), "not valid")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("# nothing but a comment\n\n", "holds no key digest"),
        (f"{sha256_hex(KEY_A)}\n{KEY_B}\n", "line 2: expected a SHA-256 hex digest"),
        (None, "cannot be read"),
    ],
)
def test_an_unusable_key_file_stops_the_service_at_start_up(
    tmp_path, model_path, content, fragment
):
    key_file = tmp_path / "keys"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ApiKeyConfigError, match=fragment) as failure:
        create_app(make_settings(model_path, api_keys_file=key_file))
    assert KEY_B not in str(failure.value)


def test_short_keys_are_refused_without_echoing_them(model_path):
    with pytest.raises(ApiKeyConfigError, match="at least 16 characters") as failure:
        create_app(make_settings(model_path, api_keys=f"{KEY_A},short-secret"))
    assert "short-secret" not in str(failure.value)


def test_keys_never_reach_the_log_of_a_real_process(tmp_path):
    settings = process_settings(tmp_path, log_level="debug", api_keys=f"{KEY_A},{KEY_B}")
    wrong = "wrong-key-but-secret-all-the-same"
    with UvicornProcess.serving(tmp_path / "server.log", settings) as server:
        url = f"{server.base_url}/predict"
        png = {"Content-Type": "image/png"}
        ok = httpx.post(url, content=UPLOAD, headers={**png, "Authorization": f"Bearer {KEY_B}"})
        assert ok.status_code == 200
        refused = httpx.post(url, content=UPLOAD, headers={**png, "X-API-Key": wrong})
        assert refused.status_code == 401
        assert httpx.post(url, content=UPLOAD, headers=png).status_code == 401
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=15)
    log = server.log()
    for secret in (KEY_A, KEY_B, wrong, sha256_hex(KEY_A), sha256_hex(KEY_B)):
        assert secret not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert {"event": "api keys", "required": True, "configured": 2} in [
        {k: e.get(k) for k in ("event", "required", "configured")} for e in events
    ]
    statuses = [e["status"] for e in events if e["event"] == "request"]
    assert statuses.count(401) == 2 and statuses.count(200) >= 1


def test_empty_variables_mean_no_keys(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_API_KEYS", " ")
    monkeypatch.setenv("CXR_API_KEYS_FILE", "")
    settings = Settings()
    assert settings.api_keys is None and settings.api_keys_file is None
    assert not ApiKeys.from_settings(settings).required
