"""The result for the RIS: the ORU^R01 validated by hl7apy as v2.5.1 and read back by the `hl7`
package, the FHIR Bundle validated by the official models (fhir.resources), and their delivery to
real peers on 127.0.0.1: the `hl7` package's MLLP server (ACK, AE, AR, silence, going away) and a
FHIR receiver doing conditional creates."""

from __future__ import annotations

import datetime
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import hl7
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from app.pacs.delivery import DeliveryWorker
from app.pacs.fhir import FhirDestination, FhirProfile, render_bundle
from app.pacs.hl7 import Hl7Profile, MllpDestination, control_id, parse_ack, render_oru
from app.pacs.outbox import Delivery, Outbox, ResultObject
from app.pacs.ris import HL7_KIND, OrderFacts, message_uid
from tests.app.pacs.pacs_results import factory_source, make_facts
from tests.app.pacs.ris_peers import FhirReceiver, MllpReceiver, validate_oru

KEY = "1.2.826.0.1.3680043.10.1001.3.0/" + "5f1d6a3c" * 8
CLOCK = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)


def order(**changes: Any) -> OrderFacts:
    source = factory_source()
    source.PatientName = "Doe^Jane^Mary^Dr^Jr"
    source.PatientID = "MRN|0042"
    source.PatientBirthDate = "20220304"
    source.PatientSex = "F"
    for keyword, value in changes.items():
        setattr(source, keyword, value)
    return OrderFacts.of_source(source)


def oru(probability: float = 0.93, profile: Hl7Profile | None = None, **changes: Any) -> str:
    message = render_oru(
        order(**changes),
        make_facts(probability=probability),
        KEY,
        profile or Hl7Profile(receiving_application="RIS"),
        warnings=["Patient age outside the training population | 1-5 years"],
        clock=lambda: CLOCK,
    )
    return message.payload.decode("utf-8")


def as_delivery(obj: ResultObject, destination: str, index: int = 1) -> Delivery:
    return Delivery(
        index,
        destination,
        obj.kind,
        obj.sop_class_uid,
        obj.sop_instance_uid,
        obj.payload,
        1,
        time.time(),
        "test",
    )


def test_the_oru_is_valid_v251_and_carries_the_result() -> None:
    text = oru()
    message = validate_oru(text)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert message.msh.msh_12.to_er7() == "2.5.1"
    parsed = hl7.parse(text)
    assert str(parsed.segment("MSH")(10)) == control_id(message_uid(KEY, HL7_KIND))
    assert len(str(parsed.segment("MSH")(10))) == 20
    pid = parsed.segment("PID")
    assert parsed.unescape(str(pid(3))) == "MRN|0042"  # escaped on the wire
    assert str(pid(5)) == "Doe^Jane^Mary^Jr^Dr" and str(pid(7)) == "20220304"
    obr = parsed.segment("OBR")
    assert str(obr(3)) == "ACC-1" and str(obr(18)) == "ACC-1" and str(obr(2)) == ""
    assert str(obr(25)) == "P" and str(obr(7)) == "20260101101500"
    assert str(obr(4)) == "36554-4^XR Chest Single view^LN"
    assert str(parsed.segment("TQ1")(9)) == "A^ASAP^HL70485"
    obx = {str(s(3)(0)(0)): s for s in parsed.segments("OBX")}
    assert str(obx["233604007"](5)) == "52101004^Present^SCT" and str(obx["233604007"](8)) == "A"
    assert float(str(obx["122157"](5))) == pytest.approx(0.93)
    assert float(str(obx["122411"](5))) == pytest.approx(0.43)
    assert str(obx["111001"](5)) == "pneumonia_cxr" and str(obx["111003"](5)) == "1.2.0"
    assert str(obx["111002"](5)) == "onnx sha256=" + "5f1d6a3c" * 8
    assert "1.2.826.0.1.3680043.10.1001.1" in str(obx["110180"](5))
    assert "1-5 years" in str(obx["CXR-WARNING"](5))
    assert all(str(s(11)) == "P" for s in parsed.segments("OBX"))
    assert "Research use only" in str(parsed.segment("NTE")(3))


def test_a_negative_answer_is_normal_and_leaves_the_priority_alone() -> None:
    text = oru(probability=0.1)
    validate_oru(text)
    parsed = hl7.parse(text)
    first = parsed.segments("OBX")[0]
    assert str(first(5)) == "2667000^Absent^SCT" and str(first(8)) == "N"
    assert "TQ1" not in [str(s(0)) for s in parsed]


def test_the_priority_goes_where_the_site_says() -> None:
    profile = Hl7Profile(
        priority_fields=("OBR-27", "ORC-7"), positive_priority="S", accession_in=("placer",)
    )
    text = oru(profile=profile)
    validate_oru(text)
    parsed = hl7.parse(text)
    assert str(parsed.segment("OBR")(27)) == "^^^^^S" and str(parsed.segment("ORC")(7)) == "^^^^^S"
    assert str(parsed.segment("OBR")(2)) == "ACC-1" and str(parsed.segment("OBR")(3)) == ""
    # an order number the image carries takes its field first
    placed = hl7.parse(oru(profile=profile, PlacerOrderNumberImagingServiceRequest="PL-7"))
    assert str(placed.segment("ORC")(2)) == "PL-7"


def test_a_rerendering_keeps_the_control_id_and_another_result_gets_another() -> None:
    first, again = hl7.parse(oru()), hl7.parse(oru(probability=0.2))
    assert str(first.segment("MSH")(10)) == str(again.segment("MSH")(10))
    other = render_oru(order(), make_facts(), KEY + "/other", Hl7Profile()).payload.decode()
    assert str(hl7.parse(other).segment("MSH")(10)) != str(first.segment("MSH")(10))


def test_parse_ack_reads_code_control_id_and_reason() -> None:
    ack = parse_ack(
        b"MSH|^~\\&|RIS|H|CXR_AI||20260101||ACK^R01^ACK|9|P|2.5.1\rMSA|AR|CXR123\r"
        b"ERR|||207^Application internal error^HL70357|E||||unknown order"
    )
    assert ack is not None
    assert (ack.code, ack.control_id, ack.error_code, ack.text) == (
        "AR",
        "CXR123",
        "207",
        "unknown order",
    )
    assert parse_ack(b"not hl7") is None


@pytest.fixture
def receiver() -> Iterator[MllpReceiver]:
    peer = MllpReceiver().start()
    yield peer
    peer.close()


def _messages(count: int) -> list[ResultObject]:
    return [
        render_oru(order(), make_facts(), f"{KEY}/{index}", Hl7Profile()) for index in range(count)
    ]


def test_mllp_aa_over_one_reused_connection(receiver: MllpReceiver) -> None:
    destination = MllpDestination.parse(receiver.address, name="hl7", ack_timeout_s=5)
    messages = _messages(3)
    for obj in messages:
        (outcome,) = destination.send([as_delivery(obj, "hl7")])
        assert (outcome.verdict, outcome.summary) == ("stored", "hl7 AA")
    assert receiver.connections == 1 and destination.connections_opened == 1
    assert receiver.control_ids() == [
        control_id(message_uid(f"{KEY}/{i}", HL7_KIND)) for i in range(3)
    ]
    for text in receiver.received:
        validate_oru(text)

    # the receiver goes away and comes back: the next message reconnects
    receiver.stop()
    (down,) = destination.send([as_delivery(messages[0], "hl7")])
    assert down.verdict == "retry" and down.summary.startswith("mllp ")
    receiver.start()
    (back,) = destination.send([as_delivery(messages[1], "hl7")])
    assert back.verdict == "stored" and destination.connections_opened == 2
    destination.close()


def test_mllp_ae_is_retried_ar_is_final_with_its_reason_and_silence_times_out(
    receiver: MllpReceiver, tmp_path: Any
) -> None:
    answers = {"AE": ("AE", "206", "database busy"), "AR": ("AR", "103", "Table value not found")}
    plan: list[str] = []
    receiver.answer = lambda message: answers.get(plan.pop(0)) if plan else ("AA", "", "")
    box = Outbox.open(tmp_path / "state")
    ae, ar = _messages(2)
    box.enqueue("r1", [ae], ["hl7"], {"k": 1})
    box.enqueue("r2", [ar], ["hl7"], {"k": 2})
    destination = MllpDestination.parse(receiver.address, name="hl7", ack_timeout_s=5)
    worker = DeliveryWorker(box, [destination], base_backoff_s=0.01, max_backoff_s=0.01)
    plan += ["AE", "AR"]
    worker.run_once()
    states = {d.sop_instance_uid: d for d in box.result("r1").deliveries}  # type: ignore[union-attr]
    first = states[ae.sop_instance_uid]
    assert first.state == "pending" and first.last_error == "hl7 AE error 206: database busy"
    (refused,) = box.result("r2").deliveries  # type: ignore[union-attr]
    assert refused.state == "failed"
    assert refused.last_error == "hl7 AR error 103: Table value not found"
    time.sleep(0.05)
    worker.run_once()
    (done,) = box.result("r1").deliveries  # type: ignore[union-attr]
    assert done.state == "delivered" and done.attempts == 2
    # the AE'd message came again under the same control ID: recognisable as a resend
    assert receiver.control_ids().count(hl7.parse(ae.payload.decode()).segment("MSH")(10)[0]) == 2
    box.close()

    # a receiver that never answers: the ACK timeout, the connection dropped, a retry
    receiver.answer = lambda message: None
    quiet = MllpDestination.parse(receiver.address, ack_timeout_s=0.3)
    started = time.monotonic()
    (outcome,) = quiet.send([as_delivery(ae, "hl7")])
    assert outcome.verdict == "retry" and outcome.summary == "mllp TimeoutError"
    assert time.monotonic() - started < 2.0


def test_mllp_connection_refused_is_a_quick_retry_for_the_whole_batch() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    destination = MllpDestination("127.0.0.1", port, connect_timeout_s=1)
    outcomes = destination.send([as_delivery(m, "hl7", i) for i, m in enumerate(_messages(3))])
    assert [o.verdict for o in outcomes] == ["retry"] * 3
    assert outcomes[0].summary == "mllp ConnectionRefusedError"


def bundle(probability: float = 0.93, key: str = KEY, **changes: Any) -> ResultObject:
    return render_bundle(
        order(**changes),
        make_facts(probability=probability),
        key,
        FhirProfile(patient_id_system="urn:oid:1.2.3.4", accession_system="urn:oid:1.2.3.5"),
        warnings=["a warning"],
        clock=lambda: CLOCK,
    )


def test_the_bundle_validates_against_the_official_models() -> None:
    document = json.loads(bundle().payload)
    parsed = Bundle.model_validate(document)
    assert parsed.type == "transaction"
    kinds = [e.resource.get_resource_type() for e in parsed.entry]
    assert kinds == [
        "Patient",
        "ServiceRequest",
        "ImagingStudy",
        "Device",
        "Observation",
        "DiagnosticReport",
    ]
    assert all(e.request.method == "POST" and e.request.ifNoneExist for e in parsed.entry)
    report = next(e.resource for e in parsed.entry if isinstance(e.resource, DiagnosticReport))
    observation = next(e.resource for e in parsed.entry if isinstance(e.resource, Observation))
    study = next(e for e in parsed.entry if e.resource.get_resource_type() == "ImagingStudy")
    assert report.status == "preliminary" and observation.status == "preliminary"
    assert report.category[0].coding[0].code == "RAD"
    assert report.code.coding[0].code == "36554-4"
    assert report.conclusionCode[0].coding[0].code == "233604007"
    assert "Research use only" in report.conclusion
    assert report.imagingStudy[0].reference == study.fullUrl
    assert study.resource.identifier[0].value == "urn:oid:1.2.826.0.1.3680043.10.1001.1"
    assert float(observation.valueQuantity.value) == pytest.approx(0.93)
    assert observation.interpretation[0].coding[0].code == "POS"
    assert observation.category[0].coding[0].code == "imaging"
    assert observation.effectiveDateTime is not None
    order_entry = parsed.entry[1]
    assert order_entry.resource.identifier[0].type.coding[0].code == "ACSN"
    assert order_entry.request.ifNoneExist == "identifier=urn:oid:1.2.3.5|ACC-1"
    negative = json.loads(bundle(probability=0.1).payload)
    Bundle.model_validate(negative)
    assert negative["entry"][4]["resource"]["interpretation"][0]["coding"][0]["code"] == "NEG"


@pytest.fixture
def fhir_server() -> Iterator[FhirReceiver]:
    server = FhirReceiver().start()
    yield server
    server.stop()


def test_fhir_transaction_creates_once_and_a_resend_creates_nothing(
    fhir_server: FhirReceiver,
) -> None:
    destination = FhirDestination(fhir_server.url, name="fhir", auth_header="Bearer s3cret")
    first = bundle()
    (outcome,) = destination.send([as_delivery(first, "fhir")])
    assert (outcome.verdict, outcome.summary) == ("stored", "fhir 200 created 6 existing 0")
    (again,) = destination.send([as_delivery(first, "fhir")])
    assert (again.verdict, again.summary) == ("stored", "fhir 200 created 0 existing 6")
    # another result of the same patient and study: one more report and observation only
    (second,) = destination.send([as_delivery(bundle(key=KEY + "/b"), "fhir")])
    assert second.summary == "fhir 200 created 2 existing 4"
    assert len(fhir_server.of_type("DiagnosticReport")) == 2
    assert len(fhir_server.of_type("Patient")) == 1
    report = fhir_server.of_type("DiagnosticReport")[0]
    assert report["imagingStudy"][0]["reference"].startswith("ImagingStudy/")
    assert fhir_server.requests[0]["authorization"] == "Bearer s3cret"
    destination.close()


def test_fhir_4xx_with_operation_outcome_is_final_5xx_and_timeouts_retried(
    fhir_server: FhirReceiver,
) -> None:
    destination = FhirDestination(fhir_server.url, name="fhir", timeout_s=0.5)
    delivery = as_delivery(bundle(), "fhir")
    fhir_server.fail_with = (
        422,
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": "bad code"}],
        },
    )
    (refused,) = destination.send([delivery])
    assert (refused.verdict, refused.summary, refused.detail) == (
        "failed",
        "fhir 422 processing",
        "bad code",
    )
    fhir_server.fail_with = (503, {"resourceType": "OperationOutcome", "issue": []})
    (busy,) = destination.send([delivery])
    assert (busy.verdict, busy.summary) == ("retry", "fhir 503")
    fhir_server.fail_with = None
    fhir_server.delay_s = 1.0
    (slow,) = destination.send([delivery])
    assert (slow.verdict, slow.summary) == ("retry", "fhir ReadTimeout")
    fhir_server.stop()
    (down,) = destination.send([delivery])
    assert down.verdict == "retry" and down.summary == "fhir ConnectError"


def test_the_ris_settings_are_checked_at_start_up(tmp_path: Any) -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    good = Settings(
        state_dir=tmp_path,
        results_hl7="mllp://ris.example:2575",
        results_hl7_priority_fields=" TQ1-9 , OBR-27",
        results_hl7_positive_priority="s",
        results_fhir_url="https://fhir.example/r4",
        results_fhir_auth="Bearer top-secret",
    )
    assert good.hl7_priority_fields == ("TQ1-9", "OBR-27")
    assert good.results_hl7_positive_priority == "S"
    assert "top-secret" not in repr(good) and "top-secret" not in str(good.model_dump())
    for wrong in (
        {"results_hl7": "http://ris:2575"},
        {"results_hl7_priority_fields": "PV1-2"},
        {"results_hl7_accession_in": "obr99"},
        {"results_hl7_positive_priority": "URGENT"},
    ):
        with pytest.raises(ValidationError):
            Settings(**{"state_dir": tmp_path, "results_hl7": "ris:2575", **wrong})
    with pytest.raises(ValidationError, match="CXR_STATE_DIR"):
        Settings(results_fhir_url="https://fhir.example/r4")
