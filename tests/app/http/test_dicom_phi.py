"""No DICOM header value ever reaches a log line or an error message.

Every patient and study attribute of the uploaded files carries a sentinel string. The files go to
a real `uvicorn` process (debug logging, stdout and stderr captured) and through every path:
accepted, accepted with an age warning, refused for intended use, refused for age, broken pixel
data, broken header values, truncated. Then the captured output, every response body and
`/metrics` are searched for the sentinels. Accepted responses may repeat the three instance UIDs in
`dicom`, and nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.testing.dicom_files import CT_STORAGE, encode_dataset, make_dataset, ramp
from tests.support.testkit import UvicornProcess, process_settings

SENTINEL = "ZQXSENTINEL"
# Tag keyword -> a value containing the sentinel (dates and ages use their own distinctive forms).
PATIENT_AND_STUDY_TAGS = {
    "PatientName": f"{SENTINEL}^NAME",
    "PatientID": f"{SENTINEL}-ID",
    "IssuerOfPatientID": f"{SENTINEL}ISSUER",
    "OtherPatientNames": f"{SENTINEL}^OTHER",
    "PatientAddress": f"{SENTINEL} STREET 1",
    "PatientTelephoneNumbers": f"{SENTINEL}TEL",
    "PatientMotherBirthName": f"{SENTINEL}^MOTHER",
    "PatientComments": f"{SENTINEL} comments",
    "PatientSex": "O",
    "PatientBirthDate": "19111111",
    "AccessionNumber": f"{SENTINEL}ACC",
    "StudyID": "ZQXSTUDY",
    "StudyDescription": f"{SENTINEL} study",
    "SeriesDescription": f"{SENTINEL} series",
    "StudyDate": "19121212",
    "InstitutionName": f"{SENTINEL} Hospital",
    "InstitutionAddress": f"{SENTINEL} Road",
    "InstitutionalDepartmentName": f"{SENTINEL} Radiology",
    "ReferringPhysicianName": f"{SENTINEL}^REFERRER",
    "PerformingPhysicianName": f"{SENTINEL}^PERFORMER",
    "OperatorsName": f"{SENTINEL}^OPERATOR",
    "StationName": "ZQXSTATION",
    "DeviceSerialNumber": f"{SENTINEL}SERIAL",
    "RequestingPhysician": f"{SENTINEL}^REQUESTER",
}
PATIENT_AGE = "087Y"
# Each long and odd enough never to occur by chance (request IDs are random hex: no bare "087").
SENTINELS = [SENTINEL, "ZQXSTUDY", "ZQXSTATION", "19111111", "19121212", PATIENT_AGE]
# UIDs with a distinctive root: they may appear in a 200 response's `dicom` object only.
UID_ROOT = "1.2.826.0.1.3680043.10.777777"
UIDS = {
    "StudyInstanceUID": f"{UID_ROOT}.1",
    "SeriesInstanceUID": f"{UID_ROOT}.2",
    "SOPInstanceUID": f"{UID_ROOT}.3",
}


def _files() -> dict[str, bytes]:
    def tagged(**options: object) -> object:
        ds = make_dataset(ramp(), patient_age=PATIENT_AGE, **options)  # type: ignore[arg-type]
        for keyword, value in {**PATIENT_AND_STUDY_TAGS, **UIDS}.items():
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPInstanceUID = UIDS["SOPInstanceUID"]
        return ds

    files = {
        "accepted-with-age-warning": encode_dataset(tagged(), "explicit_le"),
        "accepted-jpeg-ls": encode_dataset(tagged(window=(2000.0, 3000.0)), "jpeg_ls"),
        "ct": encode_dataset(tagged(modality="CT", sop_class=CT_STORAGE)),
        "lateral": encode_dataset(tagged(view="LL")),
        "skull": encode_dataset(tagged(body_part="SKULL")),
    }
    broken = tagged()
    broken.PixelData = broken.PixelData[:100]
    files["truncated-pixels"] = encode_dataset(broken)
    whole = files["accepted-with-age-warning"]
    files["truncated-file"] = whole[: len(whole) // 3]
    bad_vr = tagged(rescale=(2.0, 0.0))
    files["bad-rescale"] = encode_dataset(bad_vr).replace(b"2.0 ", b"x\x00y ")
    big = tagged()
    big.Rows = big.Columns = 65535
    files["too-many-pixels"] = encode_dataset(big)
    for name, data in files.items():
        assert SENTINEL.encode() in data, name  # the sentinels really are in the files
    return files


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    """A uvicorn process on the tiny model, logging at debug level, every Python warning shown."""
    workdir = tmp_path_factory.mktemp("phi")
    settings = {**process_settings(workdir, log_level="debug"), "PYTHONWARNINGS": "always"}
    with UvicornProcess.serving(
        workdir / "server.log", settings, ["--log-level", "debug"]
    ) as server:
        yield server


def test_no_header_value_reaches_logs_or_error_messages(served: UvicornProcess) -> None:
    base, output = served.base_url, served.log_path
    statuses = {}
    with httpx.Client(base_url=base, timeout=30) as client:
        for name, data in _files().items():
            for request in (
                {"content": data, "headers": {"content-type": "application/dicom"}},
                {"files": {"file": (f"{SENTINEL}.dcm", data, "application/dicom")}},
            ):
                response = client.post("/predict", **request)  # type: ignore[arg-type]
                statuses[name] = response.status_code
                assert response.status_code in (200, 422), (name, response.text)
                body = response.json()
                if response.status_code == 200:
                    assert body["dicom"]["sop_instance_uid"] == UIDS["SOPInstanceUID"]
                    del body["dicom"]["study_instance_uid"], body["dicom"]["series_instance_uid"]
                    del body["dicom"]["sop_instance_uid"]
                text = json.dumps(body)
                for sentinel in [*SENTINELS, UID_ROOT]:
                    assert sentinel not in text, (name, sentinel, text)
        assert client.get("/health/ready").status_code == 200
        metrics = client.get("/metrics").text
        assert 'route="/predict"' in metrics  # the requests above were counted
        for sentinel in [*SENTINELS, UID_ROOT]:
            assert sentinel not in metrics, sentinel
    assert statuses["accepted-with-age-warning"] == statuses["accepted-jpeg-ls"] == 200
    assert {statuses[n] for n in ("ct", "lateral", "skull", "truncated-pixels")} == {422}

    # The access line is written after the response is sent: wait until every request has one.
    sent = 2 * len(statuses)
    deadline = time.monotonic() + 15
    while output.read_text(errors="replace").count('"route": "/predict"') < sent:
        assert time.monotonic() < deadline, "access log lines missing"
        time.sleep(0.05)
    log = output.read_text(errors="replace")
    assert log.count('"status": 422') >= 10
    for sentinel in [*SENTINELS, UID_ROOT]:
        assert sentinel not in log, (
            sentinel,
            [line for line in log.splitlines() if sentinel in line],
        )


def test_the_sentinel_files_are_answered_in_process_too(tmp_path: Path) -> None:
    """Same files, in-process: no warning object raised by the libraries quotes a header value."""
    import warnings

    from app.errors import ServiceError
    from app.imaging.dicom import DicomPolicy
    from app.imaging.formats import DecodeLimits, decode_upload
    from training.intended_use import PAEDIATRIC_CHEST_XRAY
    from training.preprocessing import DEFAULT_PREPROCESSING

    policy = DicomPolicy(DEFAULT_PREPROCESSING.dicom, PAEDIATRIC_CHEST_XRAY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in _files().values():
            try:
                decoded = decode_upload(data, DecodeLimits(50_000_000, 64), policy)
                assert decoded.dicom is not None
                assert all(s not in " ".join(decoded.dicom.warnings) for s in SENTINELS)
            except ServiceError as exc:
                assert all(s not in exc.message for s in [*SENTINELS, UID_ROOT]), exc.message
    quoted = [str(w.message) for w in caught if any(s in str(w.message) for s in SENTINELS)]
    assert quoted == []
