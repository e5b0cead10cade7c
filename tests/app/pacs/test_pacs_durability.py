"""Durability: results queued while the PACS is down survive SIGKILL of the delivery worker (a real
subprocess over the SQLite outbox) and arrive exactly once when Orthanc comes up; re-sending the
same source adds no second SR. The worker's log names no UID and no patient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from app.pacs.delivery import StowRsDestination
from app.pacs.outbox import Outbox
from tests.app.pacs.pacs_results import (
    as_deliveries,
    enqueue_answer,
    factory_source,
    load_source,
    make_facts,
    result_objects,
)
from tests.app.pacs.pacs_servers import Orthanc

REPO = Path(__file__).resolve().parents[3]
RESULTS = 10


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_worker(state: Path, stow_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.pacs",
                "--state-dir",
                str(state),
                "--stow",
                stow_url,
                "--poll-interval",
                "0.1",
                "--max-backoff",
                "0.5",
                "--lease",
                "2",
                "--batch-size",
                "2",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


def test_results_survive_pacs_outage_and_sigkill_and_arrive_once(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, not started: the PACS is down
    state, log = tmp_path / "state", tmp_path / "worker.log"
    destination = StowRsDestination(orthanc.dicomweb).name
    box = Outbox.open(state)
    sources = [factory_source(index=300 + i) for i in range(RESULTS - 1)] + [load_source("rg1_cr")]
    expected: dict[str, str] = {}
    for index, source in enumerate(sources):
        for obj in enqueue_answer(
            box, source, make_facts(probability=0.3 + index / 20), [destination]
        ):
            expected[obj.sop_instance_uid] = obj.kind
    assert len(expected) == 2 * RESULTS

    def count(state_name: str) -> int:
        return box.stats().counts.get((state_name, destination), 0)

    def attempted() -> bool:
        return _attempts(state) >= 2

    workers = []
    try:
        # 1. PACS down: the worker retries, then is killed; nothing is lost or delivered
        workers.append(start_worker(state, orthanc.dicomweb, log))
        wait_for(attempted, 30, "a retried delivery")
        kill(workers[-1])
        assert count("pending") == 2 * RESULTS and count("delivered") == 0

        # 2. PACS up: a new worker starts delivering and is killed mid-way
        orthanc.start()
        workers.append(start_worker(state, orthanc.dicomweb, log))
        wait_for(lambda: count("delivered") >= 1, 60, "a first delivery")
        kill(workers[-1])
        delivered_before_kill = count("delivered")
        assert 0 < delivered_before_kill < 2 * RESULTS

        # 3. a third worker finishes; its leases on the killed worker's claims expire first
        workers.append(start_worker(state, orthanc.dicomweb, log))
        wait_for(lambda: count("delivered") == 2 * RESULTS, 90, "every delivery")
        workers[-1].send_signal(signal.SIGTERM)
        assert workers[-1].wait(timeout=40) == 0

        instances = orthanc.instances()
        assert len(instances) == 2 * RESULTS, (delivered_before_kill, len(instances))
        for uid in expected:
            assert len(orthanc.find_instance(uid)) == 1
        assert box.stats().counts == {("delivered", destination): 2 * RESULTS}

        # re-processing the same source: same UIDs, nothing new queued, and a forced re-send
        # (as after the rows were purged) replaces the SR in place: still one SR for the source
        again = enqueue_answer(box, sources[0], make_facts(probability=0.3), [destination])
        assert {o.sop_instance_uid for o in again} <= set(expected)
        assert box.stats().counts == {("delivered", destination): 2 * RESULTS}
        sr = next(
            o for o in result_objects(sources[0], make_facts(probability=0.3)) if o.kind == "sr"
        )
        outcome = StowRsDestination(orthanc.dicomweb).send(as_deliveries([sr], "stow"))
        assert outcome[0].verdict == "stored"
        assert len(orthanc.instances()) == 2 * RESULTS
        assert len(orthanc.find_instance(sr.sop_instance_uid)) == 1
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        orthanc.stop()
        box.close()

    text = log.read_text(encoding="utf-8", errors="replace")
    assert "outcome=delivered" in text and "outcome=retry" in text
    for secret in (*expected, "Test^Patient", "TEST-0001", "CompressedSamples", "9RG1"):
        assert secret not in text
    for source in sources:
        assert str(source.StudyInstanceUID) not in text
        assert str(source.SOPInstanceUID) not in text


def _attempts(state: Path) -> int:
    import sqlite3

    with sqlite3.connect(state / "pacs-outbox.sqlite3", timeout=10) as db:
        row = db.execute("SELECT MAX(attempts) FROM pacs_deliveries").fetchone()
    return int(row[0] or 0)
