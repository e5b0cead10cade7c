"""Results to the RIS through the real service and the real worker process, no PACS configured:
an X-ray pushed by `POST /predict?deliver=true` and by Orthanc's C-STORE gives exactly one ORU^R01
at the `hl7` package's MLLP receiver (validated by hl7apy as v2.5.1) and one FHIR transaction
(validated by fhir.resources); the delivery states and metrics show `hl7` and `fhir`; and across a
RIS outage with the worker SIGKILLed, each result arrives once, an AE is retried and an AR kept as
failed with its reason. No patient data and no credential in the logs."""

from __future__ import annotations

import io
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import httpx
import pydicom
import pytest

from app.pacs.outbox import Outbox
from app.pacs.pipeline import FHIR, HL7, render_messages
from app.pacs.uids import result_key
from app.settings import Settings
from app.testing import dicom_files as factory
from tests.app.pacs.pacs_results import factory_source, make_facts
from tests.app.pacs.pacs_servers import Orthanc, free_port, orthanc_server, require_tool
from tests.app.pacs.ris_peers import FhirReceiver, MllpReceiver, validate_oru
from tests.app.pacs.test_pacs_service import (
    PATIENT_AND_STUDY_SENTINELS,
    SENTINEL,
    SERVICE_AET,
    chest,
    predict,
    wait_for,
)
from tests.support.testkit import UvicornProcess, process_settings

REPO = Path(__file__).resolve().parents[3]
TOKEN = "Bearer ris-token-c0ffee-never-logged"


class RisLoop:
    """The service with only RIS destinations, an MLLP receiver, a FHIR receiver and Orthanc as
    the modality/router that pushes by C-STORE."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.http_port, self.dicom_port = free_port(), free_port()
        self.mllp = MllpReceiver().start()
        self.fhir = FhirReceiver().start()
        self.orthanc_extra = {
            "DicomModalities": {"cxr": [SERVICE_AET, "127.0.0.1", self.dicom_port]}
        }
        self.server: UvicornProcess | None = None

    def start_service(self) -> UvicornProcess:
        settings = process_settings(
            self.workdir,
            state_dir=str(self.workdir / "state"),
            dicom_port=str(self.dicom_port),
            dicom_ae_title=SERVICE_AET,
            # Orthanc, storescu and echoscu, all on this machine
            dicom_peers="*@127.0.0.1",
            results_hl7=self.mllp.address,
            results_hl7_receiving_application="RIS",
            results_fhir_url=self.fhir.url,
            results_fhir_auth=TOKEN,
            results_max_backoff_s="1",
            log_level="debug",
        )
        self.server = UvicornProcess.start(
            self.workdir / "server.log", settings, port=self.http_port
        )
        self.server.wait_until_ready(60.0)
        return self.server


@pytest.fixture(scope="module")
def ris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RisLoop, Orthanc]]:
    require_tool("Orthanc", "orthanc")
    workdir = tmp_path_factory.mktemp("ris")
    loop = RisLoop(workdir)
    with orthanc_server(workdir / "orthanc", extra=loop.orthanc_extra) as orthanc:
        loop.start_service()
        try:
            yield loop, orthanc
        finally:
            assert loop.server is not None
            loop.server.kill()
            loop.mllp.close()
            loop.fhir.stop()


def _messages_for(loop: RisLoop, accession: str) -> list[str]:
    return [m for m in loop.mllp.received if accession in m]


def _check_oru(text: str, data: bytes, answer: dict[str, Any]) -> None:
    validate_oru(text)
    parsed = hl7.parse(text)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert str(parsed.segment("OBR")(3)) == ds.AccessionNumber
    assert str(parsed.segment("OBR")(25)) == "P"
    obx = {str(s(3)(0)(0)): s for s in parsed.segments("OBX")}
    assert ds.StudyInstanceUID in str(obx["110180"](5))
    positive = answer["label"] == "PNEUMONIA"
    finding = "52101004^Present^SCT" if positive else "2667000^Absent^SCT"
    assert str(obx["233604007"](5)) == finding
    assert float(str(obx["122157"](5))) == pytest.approx(
        answer["probabilities"]["PNEUMONIA"], abs=1e-6
    )
    assert "Research use only" in str(parsed.segment("NTE")(3))
    segments = [str(s(0)) for s in parsed]
    assert ("TQ1" in segments) == positive
    if positive:
        assert str(parsed.segment("TQ1")(9)) == "A^ASAP^HL70485"


def bright_chest() -> tuple[bytes, str]:
    """A chest of its own whose tiny-model answer is PNEUMONIA (the model's logit grows with the
    image's mean)."""
    data, uid = chest()
    ds = pydicom.dcmread(io.BytesIO(data))
    # every pixel above a narrow window: rendered white
    ds.WindowCenter, ds.WindowWidth = 10, 10
    return factory.encode_dataset(ds, "explicit_le"), uid


@pytest.mark.parametrize("make", [chest, bright_chest], ids=["as-it-comes", "bright"])
def test_deliver_true_gives_one_oru_and_one_fhir_transaction(ris, make) -> None:  # type: ignore[no-untyped-def]
    loop, _ = ris
    data, source_uid = make()
    accession = f"ACC{source_uid[-6:].replace('.', '')}"
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.AccessionNumber = accession
    data = factory.encode_dataset(ds, "explicit_le")
    response = predict(loop.server, data)
    assert response.status_code == 200, response.text
    answer = response.json()
    if make is bright_chest:  # the urgency is set for a positive answer: make sure one is tested
        assert answer["label"] == "PNEUMONIA"
    kinds = {(d["destination"], d["kind"]) for d in answer["result"]["deliveries"]}
    assert kinds == {("hl7", "hl7-oru"), ("fhir", "fhir-bundle")}
    (text,) = wait_for(lambda: _messages_for(loop, accession))
    _check_oru(text, data, answer)
    transactions = wait_for(
        lambda: [t for t in loop.fhir.transactions if accession in str(t)], 20.0
    )
    assert len(transactions) == 1

    def all_delivered() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{loop.server.base_url}/results/{source_uid}").json()
        states = {d["state"] for d in body["result"]["deliveries"]}
        return body if states == {"delivered"} else None

    stored = wait_for(all_delivered)
    assert stored["answer"]["probabilities"] == answer["probabilities"]
    # the same image again: the same messages, already delivered; nothing new sent
    again = predict(loop.server, data).json()
    assert again["result"]["objects"] == answer["result"]["objects"]
    time.sleep(1.5)
    assert len(_messages_for(loop, accession)) == 1
    assert len([t for t in loop.fhir.transactions if accession in str(t)]) == 1


def test_orthanc_c_store_gives_one_oru_and_the_time_to_ack(ris, capsys) -> None:  # type: ignore[no-untyped-def]
    """Measured, not held to a target: from Orthanc's C-STORE push to the ORU^R01 at the MLLP
    receiver (which ACKs it at once)."""
    loop, orthanc = ris
    seconds = []
    for index in range(5):
        data, _ = chest()
        accession = f"CS{os.getpid()}{index}"
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.AccessionNumber = accession
        data = factory.encode_dataset(ds, "explicit_le")
        uploaded = httpx.post(f"{orthanc.url}/instances", content=data, timeout=30.0).json()
        started = time.perf_counter()
        httpx.post(
            f"{orthanc.url}/modalities/cxr/store",
            json={"Resources": [uploaded["ID"]], "Synchronous": True},
            timeout=60.0,
        ).raise_for_status()
        (text,) = wait_for(lambda accession=accession: _messages_for(loop, accession), 30.0)
        seconds.append(time.perf_counter() - started)
        served = predict(loop.server, data, deliver=False).json()
        validate_oru(text)
        obx = {str(s(3)(0)(0)): s for s in hl7.parse(text).segments("OBX")}
        assert float(str(obx["122157"](5))) == pytest.approx(
            served["probabilities"]["PNEUMONIA"], abs=5e-4
        )
        wait_for(
            lambda accession=accession: [t for t in loop.fhir.transactions if accession in str(t)]
        )
    with capsys.disabled():
        print(
            f"\nC-STORE push -> ORU^R01 at the MLLP receiver, 5: median "
            f"{statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms"
        )


def test_metrics_and_logs_show_the_ris_and_no_patient_data_or_token(ris) -> None:  # type: ignore[no-untyped-def]
    loop, _ = ris
    data, _ = chest()
    assert predict(loop.server, data).status_code == 200
    wait_for(lambda: len(loop.fhir.transactions) >= 1)

    def scraped() -> str | None:
        text = httpx.get(f"{loop.server.base_url}/metrics").text
        return (
            text if 'cxr_results_deliveries{destination="hl7",state="delivered"}' in text else None
        )

    metrics = wait_for(scraped)
    assert 'cxr_results_deliveries{destination="fhir",state="delivered"}' in metrics
    assert 'cxr_results_delivery_attempts_total{destination="hl7",outcome="delivered"}' in metrics
    assert loop.fhir.requests[-1]["authorization"] == TOKEN
    log = loop.server.log()
    assert "destination=hl7" in log and "destination=fhir" in log
    for secret in (
        TOKEN,
        "c0ffee",
        SENTINEL,
        "Sentinelpatient",
        *PATIENT_AND_STUDY_SENTINELS.values(),
    ):
        assert secret not in log


def _start_worker(
    state: Path, hl7_address: str, fhir_url: str, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.pacs",
                "--state-dir",
                str(state),
                "--hl7",
                hl7_address,
                "--fhir",
                fhir_url,
                "--poll-interval",
                "0.1",
                "--max-backoff",
                "0.5",
                "--lease",
                "2",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


def test_each_result_arrives_once_across_a_ris_outage_and_a_sigkill(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "worker.log"
    mllp, fhir = MllpReceiver(), FhirReceiver()  # made, not started: the RIS is down
    settings = Settings(state_dir=state, results_hl7=mllp.address, results_fhir_url=fhir.url)
    from app.pacs.pipeline import fhir_profile_from, hl7_profile_from

    box = Outbox.open(state)
    sources = [factory_source(index=500 + i) for i in range(4)]
    controls: dict[str, str] = {}
    for index, source in enumerate(sources):
        source.AccessionNumber = f"OUT-{index}"
        source.PatientName = f"Sentinelpatient^Outage{index}"
        facts = make_facts(probability=0.2 + index * 0.2)
        key = result_key(str(source.SOPInstanceUID), facts.model_sha256)
        messages = render_messages(
            source, facts, key, [], hl7_profile_from(settings), fhir_profile_from(settings)
        )
        box.enqueue(
            key,
            messages,
            [HL7, FHIR],
            {"i": index},
            routes={"hl7-oru": [HL7], "fhir-bundle": [FHIR]},
        )
        controls[f"OUT-{index}"] = str(hl7.parse(messages[0].payload.decode()).segment("MSH")(10))

    seen: dict[str, int] = {}

    def answer(message: hl7.Message) -> tuple[str, str, str]:
        accession = str(message.segment("OBR")(3))
        seen[accession] = seen.get(accession, 0) + 1
        if accession == "OUT-2" and seen[accession] == 1:
            return ("AE", "206", "busy")
        if accession == "OUT-3":
            return ("AR", "103", "Sentinelpatient unknown order")
        return ("AA", "", "")

    mllp.answer = answer

    def counts() -> dict[tuple[str, str], int]:
        return box.stats().counts

    workers = []
    try:
        workers.append(_start_worker(state, mllp.address, fhir.url, log))
        wait_for(lambda: _max_attempts(state) >= 2, 30.0)
        _kill(workers[-1])
        assert counts() == {("pending", HL7): 4, ("pending", FHIR): 4}
        mllp.start()
        fhir.start()
        started = time.perf_counter()
        workers.append(_start_worker(state, mllp.address, fhir.url, log))
        wait_for(
            lambda: counts().get(("pending", HL7), 0) + counts().get(("pending", FHIR), 0) == 0,
            60.0,
        )
        recovered_s = time.perf_counter() - started
        workers[-1].send_signal(signal.SIGTERM)
        assert workers[-1].wait(timeout=40) == 0
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        mllp.close()
        fhir.stop()

    assert counts() == {("delivered", HL7): 3, ("failed", HL7): 1, ("delivered", FHIR): 4}
    # every accepted message arrived once; the AE'd one a second time under its control ID
    accepted = [c for c in mllp.control_ids()]
    assert sorted(set(accepted)) == sorted(controls.values())
    assert accepted.count(controls["OUT-0"]) == 1 and accepted.count(controls["OUT-1"]) == 1
    assert accepted.count(controls["OUT-2"]) == 2 and accepted.count(controls["OUT-3"]) == 1
    for text in mllp.received:
        validate_oru(text)
    refused = [d for s in sources for d in _deliveries(box, s) if d.state == "failed"]
    assert [d.last_error for d in refused] == ["hl7 AR error 103: Sentinelpatient unknown order"]
    assert len(fhir.transactions) == 4
    for kind in ("DiagnosticReport", "Observation", "ImagingStudy", "ServiceRequest"):
        assert len(fhir.of_type(kind)) == 4, kind
    # one patient (the four images share a Patient ID) and one algorithm
    assert len(fhir.of_type("Patient")) == 1 and len(fhir.of_type("Device")) == 1
    box.close()
    text = log.read_text(errors="replace")
    assert "outcome=retry" in text and "outcome=failed" in text
    assert "Sentinelpatient" not in text and "OUT-" not in text
    print(f"\nRIS back + worker restarted -> all 8 deliveries settled in {recovered_s:.2f} s")


def _deliveries(box: Outbox, source: Any) -> list[Any]:
    key = result_key(str(source.SOPInstanceUID), make_facts().model_sha256)
    stored = box.result(key)
    assert stored is not None
    return stored.deliveries


def _max_attempts(state: Path) -> int:
    import sqlite3

    with sqlite3.connect(state / "pacs-outbox.sqlite3", timeout=10) as db:
        row = db.execute("SELECT MIN(attempts) FROM pacs_deliveries").fetchone()
    return int(row[0] or 0)
