"""Content decides a result, never a UID alone (issue 26, item 3).

A rogue image sent first under a genuine image's SOP Instance UID used to decide that UID's result:
the outbox kept the first row, so the genuine `POST /predict?deliver=true` caller was told its own
answer while `/results` and the PACS kept the rogue's. The pixel data's digest now joins the result
key and the result UIDs: each image is a result of its own, and a `deliver=true` caller is answered
with exactly what is stored and delivered for its image.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.sr.codedict import codes

from app.main import create_app
from app.pacs.uids import pixel_data_digest, result_instance_uid
from app.testing import dicom_files as factory
from tests.app.pacs import test_pacs_duplicates
from tests.app.pacs.intake_tools import instance, unique_uid, wait_until
from tests.app.pacs.test_pacs_duplicates import ArchiveServer
from tests.support.testkit import make_settings

# the loopback STOW-RS/WADO-RS archive fixture, shared with the duplicate-delivery tests
archive = test_pacs_duplicates.archive

GENUINE_UID = unique_uid(26, 3, 1)
BOUNDARY = "content-keys-boundary"


def _image(level: float, uid: str = GENUINE_UID) -> bytes:
    """A CR chest X-ray whose mean brightness is `level` of full scale: the tiny test model's
    answer follows the mean, so two levels give two findings."""
    stored = (factory.ramp(128, 128).astype(np.float64) * level).astype(np.uint16)
    return instance(sop_instance_uid=uid, stored=stored)


def _stow(client: TestClient, data: bytes) -> Any:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return client.post("/dicomweb/studies", content=body, headers={"content-type": content_type})


def _deliver(client: TestClient, data: bytes) -> Any:
    return client.post(
        "/predict",
        params={"deliver": "true"},
        content=data,
        headers={"content-type": "application/dicom"},
    )


def _sr_uid(answer: dict[str, Any]) -> str:
    (sr,) = [o["sop_instance_uid"] for o in answer["result"]["objects"] if o["kind"] == "sr"]
    return str(sr)


def _sr_probability(payload: bytes, tmp_path: Path) -> float:
    path = tmp_path / f"sr-{time.monotonic_ns()}.dcm"
    path.write_bytes(payload)
    group = hd.sr.srread(path).content.get_image_measurement_groups()[0]
    return float(group.get_measurements(name=codes.DCM.Probability)[0].value)


def test_a_rogue_image_under_a_genuine_uid_never_decides_the_genuine_result(
    model_path: Path, archive: ArchiveServer, tmp_path: Path
) -> None:
    """The reproduction: the rogue goes first over STOW-RS with the genuine image's UID and is
    read, stored and delivered; then the genuine image comes by `deliver=true`. What is stored and
    delivered for the genuine image is the genuine answer, and the caller is told exactly that."""
    rogue, genuine = _image(1.0), _image(0.05)
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        results_dicomweb_url=archive.dicomweb,
        results_max_backoff_s=1,
    )
    with TestClient(create_app(settings)) as client:
        assert _stow(client, rogue).status_code == 200
        assert wait_until(lambda: client.get(f"/results/{GENUINE_UID}").status_code == 200, 20)
        rogue_answer = client.get(f"/results/{GENUINE_UID}").json()
        rogue_sr = rogue_answer["result"]["objects"][0]["sop_instance_uid"]

        answer = _deliver(client, genuine)
        assert answer.status_code == 200, answer.text
        told = answer.json()
        assert told["probabilities"] != rogue_answer["answer"]["probabilities"]
        genuine_sr = _sr_uid(told)
        assert genuine_sr != rogue_sr

        # stored: by the SR's own UID, and by the source UID (the result recorded last)
        for uid in (genuine_sr, GENUINE_UID):
            stored = client.get(f"/results/{uid}").json()
            assert stored["answer"]["probabilities"] == told["probabilities"], uid
            assert stored["answer"]["label"] == told["label"], uid
        sr_file = client.get(f"/results/{genuine_sr}/sr").content
        assert pydicom.dcmread(io.BytesIO(sr_file)).SOPInstanceUID == genuine_sr

        # delivered: the archive holds the genuine SR with the genuine probability
        assert wait_until(lambda: genuine_sr in archive.archive.held, 20)
        positive = told["probabilities"]["PNEUMONIA"]
        delivered = _sr_probability(archive.archive.held[genuine_sr], tmp_path)
        assert delivered == pytest.approx(positive, abs=1e-6)
        # the rogue's own result stays its own, under UIDs the genuine one never reuses
        rogue_stored = client.get(f"/results/{rogue_sr}").json()
        assert rogue_stored["answer"]["probabilities"] == rogue_answer["answer"]["probabilities"]

    model_sha = told["model"]["sha256"]
    digest = pixel_data_digest(pydicom.dcmread(io.BytesIO(genuine)).PixelData)
    assert genuine_sr == result_instance_uid(GENUINE_UID, model_sha, "sr", None, digest)


def test_the_same_image_again_is_answered_with_what_was_stored_for_it(
    model_path: Path, tmp_path: Path
) -> None:
    """The same pixels under the same UID are one result: an image first read from the intake
    spool (where a batched model run may differ in the last digits) and then sent with
    `deliver=true` is answered with the stored answer, the one its SR renders."""
    uid = unique_uid(26, 3, 2)
    data = _image(0.5, uid)
    with TestClient(create_app(make_settings(model_path, state_dir=tmp_path / "s"))) as client:
        assert _stow(client, data).status_code == 200
        assert wait_until(lambda: client.get(f"/results/{uid}").status_code == 200, 20)
        stored = client.get(f"/results/{uid}").json()
        told = _deliver(client, data).json()
        assert _sr_uid(told) == stored["result"]["objects"][0]["sop_instance_uid"]
        for field in ("label", "probabilities", "threshold", "warnings", "dicom"):
            assert told[field] == stored["answer"][field], field
        assert told["request_id"] != stored["answer"]["request_id"]
