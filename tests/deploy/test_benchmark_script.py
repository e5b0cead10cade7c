"""The benchmark command (docs/PERFORMANCE.md) still runs end to end (in miniature: short phases,
a small burst), writes its JSON and markdown, and the service behaves under it: no 500s, no dropped
connections, a burst past the admission limit gets 429s, an overload phase past it is answered
with 200s and 429s while every probe answers, slow senders are cut off with 408 while the normal
clients beside them get no 429, and the service is ready afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.realdata import REPO_ROOT, requires_data

COMMAND = [sys.executable, "-m", "scripts.dev.benchmark"]
# run from another directory, with the project root on the module path
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
}


@requires_data
def test_the_benchmark_runs_in_one_command_and_reports_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "benchmark.json"
    subprocess.run(
        [*COMMAND, "--seconds", "0.5", "--limit-seconds", "0.2",
         "--images", "2", "--burst", "80", "--concurrency", "1", "8", "--no-memory",
         "--overload", "96", "--slow-senders", "20", "--normal-clients", "2",
         "--overload-seconds", "4",
         "--out", str(out)],
        check=True, cwd=tmp_path, env=ENV, timeout=600, capture_output=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["in_process_limit"]["images_per_s"] > 0
    j2k = report["in_process_limit"]["j2k_decode_ms_p50"]
    assert 0 < j2k["lossy"] < j2k["lossless"]  # the shipped rule reduces lossy frames only
    assert "no Keras weights" in report["naive_keras_service"]
    service = report["services"]["this checkout"]
    assert service["ready_s"] > 0 and service["metrics_status"] == 200
    phases = service["phases"]
    assert set(phases) == {
        "jpeg c=1", "jpeg c=8", "jpeg burst 80", "dicom c=1", "dicom c=8",
        "overload 96 connections", "20 slow senders, 2 normal clients",
    }  # fmt: skip
    for name, phase in phases.items():
        assert set(phase["statuses"]) <= {"200", "429"}, (name, phase["statuses"])
    for name in ("jpeg c=1", "jpeg c=8", "jpeg burst 80", "dicom c=1"):
        assert phases[name]["ok"] > 0, name
    burst = phases["jpeg burst 80"]
    assert burst["statuses"].get("429", 0) > 0  # 80 at once is past the default limit of 48
    assert burst["ready_status_after"] == 200
    assert phases["jpeg c=8"]["service_over_limit"] > 0
    overload = phases["overload 96 connections"]
    assert overload["ok"] > 0 and overload["statuses"].get("429", 0) > 0
    assert overload["goodput_over_capacity"] > 0 and overload["ready_status_after"] == 200
    assert (
        overload["capacity_just_before"] > 0 and overload["goodput_over_capacity_just_before"] > 0
    )
    slow = phases["20 slow senders, 2 normal clients"]
    assert set(slow["statuses"]) == {"200"}  # the normal clients: answered, never refused
    assert set(slow["slow"]["answered"]) <= {"408"} and slow["slow"]["connections_opened"] >= 20
    for phase in (overload, slow):
        assert set(phase["probes"]) == {
            "/health/live", "/health/ready", "probe port /health/live", "probe port /health/ready"
        }  # fmt: skip
        for probe in phase["probes"].values():
            assert probe["probes"] > 0 and set(probe["statuses"]) == {"200"}, probe
    table = out.with_suffix(".md").read_text()
    assert "as 12-bit JPEG 2000 DICOM" in table
    for name in phases:
        assert f"| {name} |" in table
