"""One verdict per study on the intake path (CXR_STUDY_STABLE_SECONDS): a study of a frontal, a
lateral and a repeat frontal sent over two associations (DCMTK storescu, then pynetdicom) to the
real service gives one result series in a real Orthanc, one SR that reads both frontal images and
names the lateral as set aside; a resend of the study adds nothing anywhere. Also the study SR
through dciodvfy and PixelMed's validator, and the ledger's quiet-study rule."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.sr.codedict import codes
from pynetdicom import AE

import app.pacs.pipeline as pipeline_module
from app.main import create_app
from app.pacs.objects import SetAsideImage, StudyImage, build_study_sr, encode
from app.pacs.outbox import Outbox
from app.pacs.spool import Spool
from app.pacs.study import ImageReading, StudyLedgers
from app.pacs.uids import image_set_digest, pixel_data_digest, result_instance_uid
from app.testing import dicom_files as factory
from tests.app.pacs.intake_tools import instance, run_tool
from tests.app.pacs.pacs_results import make_facts
from tests.app.pacs.pacs_servers import Orthanc, free_port, orthanc_server, require_tool
from tests.app.pacs.test_sr_report import PIXELMED_BASELINE_CID_100, _pixelmed
from tests.support.testkit import UvicornProcess, make_settings, process_settings

SERVICE_AET = "CXR_AI"
STABLE_S = 4.0
_UID_ROOT = "1.2.826.0.1.3680043.10.1003.77."
_counter = iter(range(1, 10**6))


def unique() -> str:
    return f"{_UID_ROOT}{os.getpid()}.{next(_counter)}"


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, UvicornProcess, int]]:
    require_tool("Orthanc", "orthanc")
    workdir = tmp_path_factory.mktemp("study-loop")
    dicom_port = free_port()
    with orthanc_server(workdir / "orthanc") as orthanc:
        server = UvicornProcess.start(
            workdir / "server.log",
            process_settings(
                workdir,
                state_dir=str(workdir / "state"),
                results_dicomweb_url=orthanc.dicomweb,
                dicom_port=str(dicom_port),
                dicom_ae_title=SERVICE_AET,
                results_max_backoff_s="1",
                study_stable_seconds=str(STABLE_S),
                dicom_open="true",
            ),
            port=free_port(),
        )
        try:
            server.wait_until_ready(60.0)
            yield orthanc, server, dicom_port
        finally:
            server.kill()


def study_images(study_uid: str) -> dict[str, bytes]:
    """A frontal CR, a lateral and a repeat frontal (other pixels) of one study and series."""
    series = unique()
    made = {}
    for name, view, seed in (("frontal", "PA", 1), ("lateral", "LL", 2), ("repeat", "PA", 3)):
        stored = np.roll(factory.ramp(128, 128), 9 * seed, axis=1)
        made[name] = instance(
            sop_instance_uid=unique(),
            study_uid=study_uid,
            stored=stored,
            view=view,
            extra={"SeriesInstanceUID": series, "PatientName": "Study^Test"},
        )
    return made


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def series_of_study(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """Orthanc's series of the study: Series Instance UID -> the Modality of each instance."""
    found = httpx.post(
        f"{orthanc.url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        timeout=10.0,
    )
    found.raise_for_status()
    series: dict[str, list[str]] = {}
    for item in found.json():
        tags = orthanc.instance_tags(item["ID"])
        series.setdefault(tags["SeriesInstanceUID"], []).append(tags.get("Modality", ""))
    return series


def intake_count(server: UvicornProcess, outcome: str, intake: str = "dimse") -> float:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10.0).text
    name = f'cxr_intake_instances_total{{intake="{intake}",outcome="{outcome}"}} '
    found = [line for line in metrics.splitlines() if line.startswith(name)]
    return float(found[0].split()[-1]) if found else 0.0


def storescu(port: int, *paths: Path) -> None:
    require_tool("storescu", "dcmtk")
    done = run_tool(["storescu", "-aec", SERVICE_AET, "127.0.0.1", str(port), *map(str, paths)])
    assert done.returncode == 0, done.stderr


def pynetdicom_store(port: int, *data: bytes) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(factory.CR_STORAGE)
    association = ae.associate("127.0.0.1", port, ae_title=SERVICE_AET)
    assert association.is_established
    try:
        for item in data:
            status = association.send_c_store(pydicom.dcmread(io.BytesIO(item)))
            assert status.Status == 0x0000
    finally:
        association.release()


def test_a_study_gets_one_result_series_naming_the_lateral_and_a_resend_adds_nothing(
    loop: tuple[Orthanc, UvicornProcess, int], tmp_path: Path
) -> None:
    orthanc, server, port = loop
    study_uid = unique()
    images = study_images(study_uid)
    uids = {name: sop_uid(data) for name, data in images.items()}
    paths = {}
    for name, data in images.items():
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(data)

    storescu(port, paths["frontal"], paths["lateral"])
    pynetdicom_store(port, images["repeat"])

    def one_delivered_result() -> dict[str, Any] | None:
        answer = httpx.get(f"{server.base_url}/results/{uids['frontal']}", timeout=10.0)
        if answer.status_code != 200:
            return None
        body = answer.json()
        states = {d["state"] for d in body["result"]["deliveries"]}
        return body if states == {"delivered"} else None

    body = wait_for(one_delivered_result, 60.0, "the study's result delivered")
    study = body["answer"]["study"]
    assert study["study_instance_uid"] == study_uid
    assert sorted(i["sop_instance_uid"] for i in study["images_read"]) == sorted(
        [uids["frontal"], uids["repeat"]]
    )
    assert [s["sop_instance_uid"] for s in study["set_aside"]] == [uids["lateral"]]
    assert "lateral" in study["set_aside"][0]["reason"]
    (sr,) = body["result"]["objects"]
    # the lateral, the repeat frontal and the study itself lead to the same study result
    for uid in (uids["lateral"], uids["repeat"], study_uid):
        same = httpx.get(f"{server.base_url}/results/{uid}", timeout=10.0).json()
        assert same["result"]["objects"] == [sr]
    sr_file = httpx.get(f"{server.base_url}/results/{uids['lateral']}/sr", timeout=10.0)
    assert sr_file.status_code == 200
    assert pydicom.dcmread(io.BytesIO(sr_file.content)).SOPInstanceUID == sr["sop_instance_uid"]

    # in the PACS (which the images were not sent to): one result series, holding the one SR,
    # and no per-image result series beside it
    series = series_of_study(orthanc, study_uid)
    assert list(series.values()) == [["SR"]], series
    (orthanc_id,) = orthanc.find_instance(sr["sop_instance_uid"])
    path = tmp_path / "study-sr.dcm"
    path.write_bytes(orthanc.file(orthanc_id))
    report = hd.sr.srread(path)
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for item in report.CurrentRequestedProcedureEvidenceSequence
        for series_item in item.ReferencedSeriesSequence
        for instance in series_item.ReferencedSOPSequence
    }
    assert referenced == {uids["frontal"], uids["repeat"]}
    groups = report.content.get_image_measurement_groups()
    sources = {
        str(g.source_images[0].referenced_sop_instance_uid) for g in groups if g.source_images
    }
    assert sources == {uids["frontal"], uids["repeat"]}
    texts = [str(item.TextValue) for item in report.ContentSequence[-1].ContentSequence[1:]]
    assert any(t.startswith(f"Set aside ({uids['lateral']}): ") and "lateral" in t for t in texts)
    verdict = report.ContentSequence[-1].ContentSequence[0]
    assert verdict.ConceptCodeSequence[0].CodeValue in (
        codes.DCM.Present.value,
        codes.DCM.Absent.value,
    )

    # a resend of the same study: read as resent, nothing new made or sent
    instances_before = len(orthanc.instances())
    resent_before = intake_count(server, "study:resent")
    storescu(port, paths["frontal"], paths["lateral"], paths["repeat"])
    wait_for(
        lambda: intake_count(server, "study:resent") == resent_before + 3,
        60.0,
        "the resent images read",
    )
    recorded = intake_count(server, "recorded", intake="study")
    # a later study, quiet after the resend was read: once its result is delivered, the study
    # loop has had every chance to make another result of the first study
    marker_study = unique()
    marker = study_images(marker_study)["frontal"]
    pynetdicom_store(port, marker)
    marker_uid = sop_uid(marker)
    wait_for(
        lambda: (
            httpx.get(f"{server.base_url}/results/{marker_uid}", timeout=10.0).status_code == 200
            and all(
                d["state"] == "delivered"
                for d in httpx.get(f"{server.base_url}/results/{marker_uid}", timeout=10.0).json()[
                    "result"
                ]["deliveries"]
            )
        ),
        60.0,
        "the marker study's result delivered",
    )
    assert intake_count(server, "recorded", intake="study") == recorded + 1  # the marker's only
    assert len(orthanc.instances()) == instances_before + 1  # the marker's SR only
    assert series_of_study(orthanc, study_uid) == series


def test_a_new_frontal_after_the_result_makes_the_study_again_in_the_same_series(
    loop: tuple[Orthanc, UvicornProcess, int], tmp_path: Path
) -> None:
    orthanc, server, port = loop
    study_uid = unique()
    images = study_images(study_uid)
    first_uid, repeat_uid = sop_uid(images["frontal"]), sop_uid(images["repeat"])
    pynetdicom_store(port, images["frontal"])

    def delivered_objects(uid: str) -> list[dict[str, Any]] | None:
        answer = httpx.get(f"{server.base_url}/results/{uid}", timeout=10.0)
        if answer.status_code != 200:
            return None
        result = answer.json()["result"]
        done = {d["state"] for d in result["deliveries"]} == {"delivered"}
        return result["objects"] if done else None

    (first,) = wait_for(lambda: delivered_objects(first_uid), 60.0, "the first result")
    pynetdicom_store(port, images["repeat"])

    def second() -> list[dict[str, Any]] | None:
        found = delivered_objects(repeat_uid)
        return found if found and found[0] != first else None

    (made_again,) = wait_for(second, 60.0, "the study's result made again")
    assert made_again["sop_instance_uid"] != first["sop_instance_uid"]
    series = series_of_study(orthanc, study_uid)
    assert list(series.values()) == [["SR", "SR"]], series


def stow(server: UvicornProcess, *data: bytes) -> httpx.Response:
    boundary = "study-results-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + item + b"\r\n"
        for item in data
    )
    return httpx.post(
        f"{server.base_url}/dicomweb/studies",
        content=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
        timeout=30.0,
    )


def test_stow_rs_stores_the_lateral_and_the_study_sr_names_it(
    loop: tuple[Orthanc, UvicornProcess, int],
) -> None:
    orthanc, server, _ = loop
    study_uid = unique()
    images = study_images(study_uid)
    stored = stow(server, images["frontal"], images["lateral"])
    assert stored.status_code == 200, stored.text  # the lateral too: the study names it
    lateral_uid = sop_uid(images["lateral"])

    def delivered() -> dict[str, Any] | None:
        answer = httpx.get(f"{server.base_url}/results/{lateral_uid}", timeout=10.0)
        if answer.status_code != 200:
            return None
        body = answer.json()
        states = {d["state"] for d in body["result"]["deliveries"]}
        return body if states == {"delivered"} else None

    body = wait_for(delivered, 60.0, "the study's result delivered")
    assert [i["sop_instance_uid"] for i in body["answer"]["study"]["images_read"]] == [
        sop_uid(images["frontal"])
    ]
    assert [s["sop_instance_uid"] for s in body["answer"]["study"]["set_aside"]] == [lateral_uid]
    assert list(series_of_study(orthanc, study_uid).values()) == [["SR"]]


# -- the study SR on its own ------------------------------------------------------------------


def _study(tmp_path: Path) -> tuple[list[StudyImage], list[SetAsideImage], str]:
    study_uid = unique()
    made = study_images(study_uid)
    frontal = pydicom.dcmread(io.BytesIO(made["frontal"]), stop_before_pixels=True)
    repeat = pydicom.dcmread(io.BytesIO(made["repeat"]), stop_before_pixels=True)
    images = [
        StudyImage(frontal, make_facts(probability=0.2113, cam_grid=None)),
        StudyImage(repeat, make_facts(probability=0.8731)),
    ]
    aside = [SetAsideImage(sop_uid(made["lateral"]), "View Position LL is a lateral view")]
    digest = image_set_digest({sop_uid(d): f"{i:064x}" for i, d in enumerate(made.values())})
    return images, aside, digest


def test_the_study_sr_is_decided_by_its_most_positive_image_and_is_deterministic(
    tmp_path: Path,
) -> None:
    images, aside, digest = _study(tmp_path)
    built = build_study_sr(images, aside, digest)
    again = build_study_sr(list(reversed(images)), aside, digest)
    assert encode(built) == encode(again)  # not a function of arrival order
    verdict = built.ContentSequence[-1].ContentSequence[0]
    assert verdict.ConceptCodeSequence[0].CodeValue == codes.DCM.Present.value
    other = build_study_sr(images, aside, "f" * 64)
    assert other.SOPInstanceUID != built.SOPInstanceUID
    assert other.SeriesInstanceUID == built.SeriesInstanceUID
    negative = [images[0]]
    alone = build_study_sr(negative, aside, digest)
    assert alone.ContentSequence[-1].ContentSequence[0].ConceptCodeSequence[0].CodeValue == (
        codes.DCM.Absent.value
    )


def test_the_deciding_images_group_comes_first_and_keeps_its_number(tmp_path: Path) -> None:
    """A viewer opens an SR at its first measurement group (OHIF does): the deciding image's."""
    images, aside, digest = _study(tmp_path)
    low, high = sorted((i.source for i in images), key=lambda source: str(source.SOPInstanceUID))
    # the image numbered 2 (numbers follow SOP Instance UID order) decides
    images = [StudyImage(low, images[0].facts), StudyImage(high, images[1].facts)]
    measurements = build_study_sr(images, aside, digest).ContentSequence
    groups = next(
        item for item in measurements if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ).ContentSequence

    def comment(group: Any) -> str:
        return next(
            str(item.TextValue)
            for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "121106"
        )

    assert [comment(group) for group in groups] == [
        "Image 2: pneumonia likely",
        "Attention map peak, not a detection",
        "Image 1: pneumonia unlikely",
    ]


def test_dciodvfy_and_pixelmed_find_no_error_in_the_study_sr(tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    images, aside, digest = _study(tmp_path)
    path = tmp_path / "study-sr.dcm"
    path.write_bytes(encode(build_study_sr(images, aside, digest)))
    run = run_tool([dciodvfy, str(path)])
    output = run.stdout + run.stderr
    assert "Comprehensive3DSR" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []
    lines = _pixelmed(path)
    errors = [
        line
        for line in lines
        if line.startswith("Error") and not PIXELMED_BASELINE_CID_100.match(line)
    ]
    assert errors == []


# -- the ledger ---------------------------------------------------------------------------------


def _reading(uid: str, digest: str = "a" * 64) -> ImageReading:
    return ImageReading(uid, digest, {}, set_aside="not read")


def test_a_study_is_due_once_quiet_and_nothing_received_before_then_is_unread(
    tmp_path: Path,
) -> None:
    ledgers = StudyLedgers(tmp_path / "studies")
    ledgers.add("1.2.3", _reading("1.2.3.1"), arrived_at=100.0)
    ledgers.add("1.2.3", _reading("1.2.3.2"), arrived_at=103.0)
    assert ledgers.due(5.0, now=107.9, oldest_unread=None) == []  # 4.9 s quiet
    assert ledgers.due(5.0, now=108.0, oldest_unread=None) == ["1.2.3"]
    # an image received within the quiet time is still on the spool: it may be of this study
    assert ledgers.due(5.0, now=200.0, oldest_unread=107.0) == []
    assert ledgers.due(5.0, now=200.0, oldest_unread=108.0) == ["1.2.3"]
    ledger = ledgers.get("1.2.3")
    assert ledger is not None
    waiting = tmp_path / "studies" / "waiting" / "1.2.3"
    assert waiting.exists()
    ledgers.mark_rendered("1.2.3", ledger.images_digest)
    assert ledgers.due(5.0, now=200.0, oldest_unread=None) == []
    assert not waiting.exists()  # what `due` reads is the studies still waiting only
    # the same image again changes nothing; other pixels under its UID change the set
    ledgers.add("1.2.3", _reading("1.2.3.2"), arrived_at=150.0)
    assert ledgers.due(5.0, now=200.0, oldest_unread=None) == []
    ledgers.add("1.2.3", _reading("1.2.3.2", "b" * 64), arrived_at=160.0)
    assert ledgers.due(5.0, now=200.0, oldest_unread=None) == ["1.2.3"]
    assert ledgers.study_of("1.2.3.1") == "1.2.3"
    assert oct((tmp_path / "studies" / "1.2.3.json").stat().st_mode & 0o777) == "0o600"


def test_a_study_made_and_quiet_past_the_retention_is_forgotten(tmp_path: Path) -> None:
    ledgers = StudyLedgers(tmp_path / "studies")
    ledgers.add("1.2.3", _reading("1.2.3.1"), arrived_at=100.0)
    ledgers.add("1.2.4", _reading("1.2.4.1"), arrived_at=100.0)
    made = ledgers.get("1.2.3")
    assert made is not None
    ledgers.mark_rendered("1.2.3", made.images_digest)
    assert ledgers.prune(older_than=99.0) == 0  # not quiet that long
    assert ledgers.prune(older_than=101.0) == 1  # 1.2.4 has no result yet: kept
    assert ledgers.get("1.2.3") is None and ledgers.study_of("1.2.3.1") is None
    assert ledgers.get("1.2.4") is not None


def test_the_spool_says_when_its_oldest_unread_image_arrived(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "intake", 10, 10**6)
    assert spool.oldest_arrival() is None
    first = spool.put("1.2.3.1", b"first", {})
    os.utime(first.path, (1000.0, 1000.0))
    second = spool.put("1.2.3.2", b"second", {})
    os.utime(second.path, (2000.0, 2000.0))
    assert spool.oldest_arrival() == 1000.0
    claimed = spool.claim()  # being read: still unread, and its arrival time kept
    assert claimed is not None and claimed.sop_instance_uid == "1.2.3.1"
    assert spool.oldest_arrival() == 1000.0
    spool.done(claimed)
    assert spool.oldest_arrival() == 2000.0


def test_a_study_result_the_outbox_could_not_store_is_stored_on_a_later_try(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "_STUDY_RETRY_S", 0.2)
    settings = make_settings(model_path, state_dir=tmp_path / "state", study_stable_seconds=0.2)
    image = study_images(unique())["frontal"]
    uid = sop_uid(image)
    with TestClient(create_app(settings)) as client:
        pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
        working = pipeline.outbox
        # an outbox that cannot be written (closed): the study waits instead of being dropped
        closed = Outbox.open(tmp_path / "closed", None)
        closed.close()
        pipeline.outbox = closed
        try:
            headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
            body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + image + b"\r\n--b--\r\n"
            assert (
                client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
            )
            wait_for(
                lambda: any(k.startswith("study:deferred:") for k in pipeline.stats),
                20.0,
                "the failed store counted",
            )
        finally:
            pipeline.outbox = working
        stored = wait_for(
            lambda: client.get(f"/results/{uid}").status_code == 200, 20.0, "the study stored"
        )
        assert stored
        answer = client.get(f"/results/{uid}").json()["answer"]
        assert [i["sop_instance_uid"] for i in answer["study"]["images_read"]] == [uid]
        # counted just after the result is stored (and so visible): waited for, not raced
        wait_for(lambda: pipeline.stats["study:recorded"] == 1, 20.0, "the study counted")
        assert pipeline.stats["study:recorded"] == 1


def test_deliver_true_keeps_its_own_result_per_image_when_the_intake_reads_studies(
    model_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(model_path, state_dir=tmp_path / "state", study_stable_seconds=0.2)
    image = study_images(unique())["frontal"]
    uid = sop_uid(image)
    source = pydicom.dcmread(io.BytesIO(image))
    digest = pixel_data_digest(bytes(source.PixelData))
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/predict",
            params={"deliver": "true"},
            content=image,
            headers={"content-type": "application/dicom"},
        )
        assert answer.status_code == 200, answer.text
        (sr,) = answer.json()["result"]["objects"]
        sha = answer.json()["model"]["sha256"]
        # the per-image SR, under the image's own UIDs, not a study's
        assert sr["sop_instance_uid"] == result_instance_uid(uid, sha, "sr", None, digest)
        stored = client.get(f"/results/{uid}").json()
        assert "study" not in stored["answer"]
        assert stored["result"]["objects"] == [sr]
