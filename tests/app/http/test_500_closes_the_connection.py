"""A 500 closes the connection cleanly, on a real uvicorn process: the answer carries
`Connection: close` (Starlette re-raises the error after answering and uvicorn then closes the
socket), so a keep-alive client opens a new connection instead of losing its next request."""

from __future__ import annotations

import http.client
from pathlib import Path

import httpx

from app.testing.dicom_files import make_dicom, ramp
from tests.app.http.service_with_a_defect import DEFECT_PATH, DEFECT_SECRET
from tests.app.imaging.test_robustness import sop_instance_uid_vr_corrupted
from tests.support.testkit import UvicornProcess, process_settings

DEFECTIVE_APP = "tests.app.http.service_with_a_defect:app"


def test_after_a_500_the_next_request_on_a_keep_alive_client_is_answered(tmp_path: Path) -> None:
    settings = process_settings(tmp_path)
    with UvicornProcess.serving(tmp_path / "server.log", settings, app=DEFECTIVE_APP) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        good = make_dicom(ramp())
        for _ in range(10):
            connection.request("GET", DEFECT_PATH)
            failed = connection.getresponse()
            body = failed.read()
            assert failed.status == 500, body
            assert failed.getheader("connection") == "close"
            assert failed.will_close  # http.client opens a new connection for the next request
            # the same client object: http.client reconnects; no reset, no RemoteDisconnected
            connection.request(
                "POST", "/predict", body=good, headers={"Content-Type": "application/dicom"}
            )
            answered = connection.getresponse()
            assert answered.status == 200, answered.read()
            answered.read()
        connection.close()
        # a pooled client (httpx) sees no protocol error either
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            for _ in range(10):
                assert client.get(DEFECT_PATH).status_code == 500
                assert client.get("/health/live").status_code == 200
    log = server.log()
    assert log.count("unhandled error") == 20
    # Where it went wrong is logged (ours and uvicorn's own report), never what the messages said.
    assert "builtins.RuntimeError" in log and "builtins.KeyError" in log
    assert "in defect" in log
    assert DEFECT_SECRET not in log


def test_hostile_dicom_over_a_real_keep_alive_connection_is_422_and_keeps_it(
    tmp_path: Path,
) -> None:
    settings = process_settings(tmp_path)
    with UvicornProcess.serving(tmp_path / "server.log", settings) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Content-Type": "application/dicom"}
        for data in (sop_instance_uid_vr_corrupted(), make_dicom(ramp())) * 3:
            connection.request("POST", "/predict", body=data, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status in (200, 422)
            assert response.getheader("connection") is None  # kept alive
        connection.close()
    assert "unhandled error" not in server.log()


def test_the_fuzz_script_counts_no_5xx_and_no_dropped_connection(tmp_path: Path) -> None:
    """`python -m scripts.dev.fuzz` in miniature against a real service on the tiny model (the long
    run is the same command with 20,000+ mutants)."""
    import json
    import subprocess
    import sys

    from tests.support.testkit import write_model_dir

    out = tmp_path / "fuzz.json"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.dev.fuzz", "--mutants", "300", "--seed", "11",
         "--model", str(write_model_dir(tmp_path)), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mutants_sent"] == 300
    assert result["five_xx"] == 0 and result["dropped_connections"] == 0
    assert result["requests"]["batch"] > 0 and result["batch_part_statuses"]["422"] > 0
    assert result["ready_after"] == 200 and result["server_log_unhandled_errors"] == 0
