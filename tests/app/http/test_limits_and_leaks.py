"""Limits and leaks (issue 26, item 4): each finding reproduced, and each now refused.

- STOW-RS had no part-count limit: 1.8 MB of empty parts cost 4.5 s of CPU and an 8.2 MB 409
  listing each part.
- A malformed `CXR_STATE_URL` put the database password in `/health/ready` and the log.
- With no keys, a cross-origin browser form POST to `/predict?deliver=true` wrote into the PACS.
- Answers with patient data had no `Cache-Control: no-store`.
- `CXR_API_KEYS=" , "` started the service open.
- The site report files were world-readable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.http.auth import ApiKeyConfigError
from app.main import create_app
from app.site_validation.validate import write_private
from app.testing.dicom_files import make_dicom, ramp
from tests.app.pacs.pacs_servers import free_port
from tests.support.testkit import make_settings

BOUNDARY = "limits-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PASSWORD = "Pw-SECRET-2611"


def test_ten_thousand_empty_stow_parts_are_refused_whole_within_a_second(
    model_path: Path, tmp_path: Path
) -> None:
    body = (f"--{BOUNDARY}\r\n\r\n\r\n" * 10_000 + f"--{BOUNDARY}--\r\n").encode()
    with TestClient(create_app(make_settings(model_path, state_dir=tmp_path / "s"))) as client:
        started = time.perf_counter()
        answer = client.post("/dicomweb/studies", content=body, headers={"content-type": STOW_TYPE})
        elapsed = time.perf_counter() - started
        assert answer.status_code == 413, answer.text[:200]
        assert answer.json()["error"]["code"] == "too_many_parts"
        assert len(answer.content) < 500
        assert elapsed < 1.0, elapsed
        # a request within the limit is still read part by part
        few = (f"--{BOUNDARY}\r\n\r\n\r\n" * 3 + f"--{BOUNDARY}--\r\n").encode()
        answer = client.post("/dicomweb/studies", content=few, headers={"content-type": STOW_TYPE})
        assert answer.status_code == 409
        assert len(answer.json()["00081198"]["Value"]) == 3


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://cxr:{PASSWORD}%zz@127.0.0.1/cxr",  # libpq quotes a bad %-escape whole
        f"postgresql://cxr:{PASSWORD}@db:port/cxr",
        f"postgresql://cxr:{PASSWORD} @db/cxr",
        f"mysql://cxr:{PASSWORD}@db/cxr",
    ],
)
def test_a_malformed_state_url_is_refused_at_start_without_its_password(
    model_path: Path, tmp_path: Path, url: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(model_path, state_dir=tmp_path, state_url=url)
    assert PASSWORD not in str(refused.value)
    assert "CXR_STATE_URL" not in str(refused.value) or "password" in str(refused.value)


def test_a_database_error_quoting_the_url_reaches_no_answer_and_no_log(
    model_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The driver's message quotes the connection string (libpq does, for a string it cannot
    parse): readiness, the probe port, /model and the log serve a fixed reason instead."""
    url = f"postgresql://cxr:{PASSWORD}@127.0.0.1:1/cxr"

    def connect(conninfo: str, **_: object) -> None:
        raise psycopg.OperationalError(f'invalid connection string "{conninfo}"')

    monkeypatch.setattr(psycopg, "connect", connect)
    probe_port = free_port()
    settings = make_settings(
        model_path, state_dir=tmp_path, state_url=url, probe_port=probe_port, log_level="INFO"
    )
    with TestClient(create_app(settings)) as client:
        answers = [client.get("/health/ready"), client.get("/model")]
        answers.append(httpx.get(f"http://127.0.0.1:{probe_port}/health/ready", timeout=5.0))
        for answer in answers:
            assert answer.status_code == 503
            assert PASSWORD not in answer.text
            assert "CXR_STATE_URL" in answer.json()["error"]["message"]
    # every record with its structured fields, as the JSON log writes them
    assert "dicom networking not ready" in [r.getMessage() for r in caplog.records]
    assert all(PASSWORD not in str(r.__dict__) for r in caplog.records)


def _form_post(client: TestClient, data: bytes, **headers: str) -> httpx.Response:
    return client.post(
        "/predict",
        params={"deliver": "true"},
        files={"file": ("x.dcm", data, "application/dicom")},
        headers=headers,
    )


def test_a_cross_site_form_post_is_refused_and_an_api_client_gets_through(
    model_path: Path, tmp_path: Path
) -> None:
    data = make_dicom(ramp(128, 128))
    settings = make_settings(
        model_path, state_dir=tmp_path / "s", allowed_origins="https://viewer.example.org"
    )
    with TestClient(create_app(settings)) as client:
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            refused = _form_post(client, data, **headers)
            assert refused.status_code == 403, headers
            assert refused.json()["error"]["code"] == "cross_origin"
        source = make_dicom(ramp(128, 128))
        assert client.get("/results/1.2.826.0.1.3680043.10.1001.3").status_code == 404
        # no Origin (curl, a router), the service's own pages and a listed origin pass
        for headers in (
            {},
            {"Origin": "http://testserver"},
            {"Origin": "https://viewer.example.org"},
        ):
            answer = _form_post(client, source, **headers)
            assert answer.status_code == 200, (headers, answer.text)
            assert answer.headers["cache-control"] == "no-store"
        uid = answer.json()["result"]["source_sop_instance_uid"]
        stored = client.get(f"/results/{uid}")
        assert stored.status_code == 200 and stored.headers["cache-control"] == "no-store"
        assert "cache-control" not in client.get("/health/live").headers


def test_trusted_hosts_refuse_another_host_but_not_the_probes(model_path: Path) -> None:
    settings = make_settings(model_path, trusted_hosts="cxr.example.org, *.hospital.example")
    with TestClient(create_app(settings)) as client:
        refused = client.get("/model")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
        assert client.get("/health/ready").status_code == 200
        for host in ("cxr.example.org", "cxr.example.org:8000", "ai.hospital.example"):
            assert client.get("/model", headers={"Host": host}).status_code == 200, host
        assert client.get("/model", headers={"Host": "evil.example"}).status_code == 400


@pytest.mark.parametrize("keys", [" , ", ",", " ,, , "])
def test_a_key_setting_that_names_no_key_is_refused_at_start(model_path: Path, keys: str) -> None:
    with pytest.raises(ApiKeyConfigError, match="names no key"):
        create_app(make_settings(model_path, api_keys=keys))


def test_the_site_report_files_are_written_for_their_owner_only(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        report = tmp_path / "report.html"
        report.write_text("old")
        report.chmod(0o644)  # a report an earlier version left readable
        write_private(report, "<html>cases</html>")
        write_private(tmp_path / "results.json", "{}")
    finally:
        os.umask(previous)
    assert report.read_text() == "<html>cases</html>"
    for name in ("report.html", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
