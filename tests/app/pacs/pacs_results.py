"""Test data for the PACS tests: answers, source images (the test factory's CR and DX files and
the real CR chest PA from pydicom-data), the result objects built from them, and a clock for
highdicom to render them under."""

from __future__ import annotations

import datetime
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from app.pacs.objects import ResultFacts, build_heatmap_sc, build_sr, encode
from app.pacs.outbox import Delivery, Outbox, ResultObject
from app.pacs.uids import result_key
from app.testing.dicom_files import CR_STORAGE, DX_STORAGE, make_dataset, ramp

MODEL_SHA256 = "5f1d6a3c" * 8
DISCLAIMER = (
    "Research use only. This is not a medical device and must not be used for diagnosis or "
    "treatment decisions; a qualified clinician must review every image."
)
CAM = [[0.0, 0.1, 0.2, 0.1], [0.1, 0.4, 1.0, 0.3], [0.0, 0.2, 0.5, 0.2], [0.0, 0.0, 0.1, 0.0]]


def make_facts(
    probability: float = 0.8731, threshold: float = 0.43, **changes: object
) -> ResultFacts:
    fields: dict[str, object] = {
        "label": "PNEUMONIA" if probability >= threshold else "NORMAL",
        "probabilities": {"NORMAL": round(1.0 - probability, 6), "PNEUMONIA": probability},
        "positive_class": "PNEUMONIA",
        "threshold": threshold,
        "model_name": "pneumonia_cxr",
        "model_version": "1.2.0",
        "model_sha256": MODEL_SHA256,
        "disclaimer": DISCLAIMER,
        "cam_grid": CAM,
    }
    fields.update(changes)
    return ResultFacts(**fields)  # type: ignore[arg-type]


def rg1_path(name: str = "RG1_UNCR.dcm") -> Path:
    """The real CR chest PA of pydicom-data (the `dev` extra), never downloaded: uncompressed,
    or `RG1_J2KR.dcm`, the same image in JPEG 2000 lossless."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        message = "pydicom-data is not installed (pip install -e .[dev])"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(str(found))


def factory_source(kind: str = "CR", index: int = 0) -> Dataset:
    """A frontal chest radiograph from the test factory, with its own UIDs per `index`."""
    ds = make_dataset(
        ramp(),
        modality=kind,
        sop_class=CR_STORAGE if kind == "CR" else DX_STORAGE,
        extra={"StudyDate": "20260101", "StudyTime": "101500", "AccessionNumber": "ACC-1"},
    )
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1001.3.{index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if index:
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1001.1.{index}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1001.2.{index}"
    return ds


SOURCES = ("factory_cr", "factory_dx", "rg1_cr")


def load_source(name: str) -> Dataset:
    if name == "rg1_cr":
        return pydicom.dcmread(rg1_path())
    return factory_source("CR" if name == "factory_cr" else "DX")


def grey_u8(rows: int = 224, columns: int = 224) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:columns]
    return ((xx + yy) * 255 // (rows + columns - 2)).astype(np.uint8)


@contextmanager
def highdicom_clock_at(moment: datetime.datetime) -> Iterator[None]:
    """highdicom's `datetime.datetime.now()` answers `moment`, in every highdicom module that
    reads the clock (each imports the `datetime` module and calls it at construction)."""

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Frozen:
            return cls.combine(moment.date(), moment.time(), tz)

    clock = types.SimpleNamespace(
        **{name: getattr(datetime, name) for name in dir(datetime) if not name.startswith("__")}
    )
    clock.datetime = Frozen
    patched = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("highdicom") and getattr(module, "datetime", None) is datetime
    ]
    assert patched, "highdicom no longer imports `datetime`: find its clock anew"
    for module in patched:
        module.datetime = clock  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in patched:
            module.datetime = datetime  # type: ignore[attr-defined]


def result_objects(source: Dataset, facts: ResultFacts) -> list[ResultObject]:
    sr = build_sr(source, facts)
    sc = build_heatmap_sc(source, facts, grey_u8())
    return [
        ResultObject("sr", str(sr.SOPClassUID), str(sr.SOPInstanceUID), encode(sr)),
        ResultObject("sc", str(sc.SOPClassUID), str(sc.SOPInstanceUID), encode(sc)),
    ]


def answer_json(facts: ResultFacts) -> dict[str, object]:
    return {
        "label": facts.label,
        "probabilities": facts.probabilities,
        "threshold": facts.threshold,
        "model": {
            "name": facts.model_name,
            "version": facts.model_version,
            "sha256": facts.model_sha256,
        },
        "disclaimer": facts.disclaimer,
    }


def enqueue_answer(
    outbox: Outbox,
    source: Dataset,
    facts: ResultFacts,
    destinations: list[str],
    now: float | None = None,
) -> list[ResultObject]:
    objects = result_objects(source, facts)
    outbox.enqueue(
        result_key(str(source.SOPInstanceUID), facts.model_sha256),
        objects,
        destinations,
        answer_json(facts),
        now=now,
    )
    return objects


def as_deliveries(objects: list[ResultObject], destination: str) -> list[Delivery]:
    return [
        Delivery(
            id=i,
            destination=destination,
            kind=o.kind,
            sop_class_uid=o.sop_class_uid,
            sop_instance_uid=o.sop_instance_uid,
            payload=o.payload,
            attempts=1,
            created_at=0.0,
            lease_owner="test",
        )
        for i, o in enumerate(objects)
    ]


def assert_no_header_value_logged(
    source: Dataset, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """No log record at INFO or above and no warning names the patient, the referring physician
    (RG1's "ward") or the source's UIDs."""
    header_values = [str(source.PatientName), str(source.PatientID), "ward"]
    header_values += [str(source.SOPInstanceUID), str(source.StudyInstanceUID)]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= 20] + [
        str(w.message) for w in recwarn
    ]
    for value in header_values:
        assert not any(value in line for line in logged), value
