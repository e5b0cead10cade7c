"""Finding a site's cases: layouts, labels, patients (file names, manifest, labels.csv, DICOM
header, identical bytes) and bounded header subgroups."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app.site_validation.cases import CasesError, find_cases
from app.site_validation.validate import _union_patients
from app.testing.dicom_files import make_dicom, ramp


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_kermany_file_names_give_patients_and_subtypes(tmp_path: Path) -> None:
    for name in ("IM-0011-0001.jpeg", "IM-0011-0001-0002.jpeg", "NORMAL2-IM-0383-0001.jpeg"):
        _touch(tmp_path / "normal" / name)
    _touch(tmp_path / "PNEUMONIA" / "ward" / "person12_bacteria_45.jpeg")
    _touch(tmp_path / "PNEUMONIA" / "person12_virus_46.jpeg")
    _touch(tmp_path / "PNEUMONIA" / ".DS_Store")
    found = find_cases(tmp_path)
    assert found.kind == "kaggle"
    patients = {c.name: c.patient for c in found.cases}
    assert patients == {
        "normal/IM-0011-0001.jpeg": "IM-0011",
        "normal/IM-0011-0001-0002.jpeg": "IM-0011",
        "normal/NORMAL2-IM-0383-0001.jpeg": "NORMAL2-IM-0383",
        "PNEUMONIA/person12_virus_46.jpeg": "person12",
        "PNEUMONIA/ward/person12_bacteria_45.jpeg": "person12",
    }
    by_name = {c.name: c for c in found.cases}
    assert by_name["PNEUMONIA/ward/person12_bacteria_45.jpeg"].subgroups == {
        "folder": "ward",
        "subtype": "bacteria",
    }
    assert [c.positive for c in found.cases] == [False, False, False, True, True]


def test_a_manifest_beside_the_split_names_the_patients(tmp_path: Path) -> None:
    _touch(tmp_path / "test" / "NORMAL" / "a.jpeg")
    _touch(tmp_path / "test" / "PNEUMONIA" / "b.jpeg")
    with (tmp_path / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "label", "filename", "patient_id"])
        writer.writerow(["test", "NORMAL", "a.jpeg", "P-1"])
        writer.writerow(["train", "PNEUMONIA", "b.jpeg", "P-9"])  # another split
        writer.writerow(["test", "PNEUMONIA", "b.jpeg", "P-1"])
    found = find_cases(tmp_path / "test")
    assert [(c.patient, c.patient_source) for c in found.cases] == [
        ("P-1", "manifest"),
        ("P-1", "manifest"),
    ]


def test_dicom_folder_labels_by_file_or_uid_and_header_subgroups(tmp_path: Path) -> None:
    first = make_dicom(
        ramp(),
        view="AP",
        patient_age="070Y",
        extra={
            "PatientID": "MRN-1",
            "PatientSex": "F",
            "Manufacturer": "Acme <b>",
            "SOPInstanceUID": "1.2.3.4",
        },
    )
    second = make_dicom(ramp(), view="LL", patient_age=None, extra={"PatientID": "MRN-1"})
    _touch(tmp_path / "x" / "one.dcm", first)
    _touch(tmp_path / "two.dcm", second)
    _touch(tmp_path / "stray.dcm", second)
    (tmp_path / "labels.csv").write_text(
        "file,sop_instance_uid,label,patient_id\n,1.2.3.4,Pneumonia,\ntwo.dcm,,0,site-77\n",
        encoding="utf-8",
    )
    found = find_cases(tmp_path)
    assert found.kind == "dicom"
    cases = {c.name: c for c in found.cases}
    assert set(cases) == {"x/one.dcm", "two.dcm"}
    one, two = cases["x/one.dcm"], cases["two.dcm"]
    assert one.positive and not two.positive
    assert (one.patient_source, two.patient_source) == ("dicom", "labels.csv")
    assert one.subgroups == {
        "view position": "AP",
        "manufacturer": "other",  # fewer than 5 images of it: folded into `other`
        "age band": "65 and over",
        "sex": "female",
        "folder": "x",
    }
    assert two.subgroups["view position"] == "other"
    assert two.subgroups["age band"] == "not recorded"
    assert any("1 files without a row" in note for note in found.notes)


def test_bad_labels_and_unknown_layouts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CasesError, match="neither NORMAL/ and PNEUMONIA/"):
        find_cases(tmp_path)
    _touch(tmp_path / "a.dcm")
    (tmp_path / "labels.csv").write_text("file,label\na.dcm,maybe\n", encoding="utf-8")
    with pytest.raises(CasesError, match="line 2: label must be one of"):
        find_cases(tmp_path)
    (tmp_path / "labels.csv").write_text("name,label\na.dcm,1\n", encoding="utf-8")
    with pytest.raises(CasesError, match="needs a `label` column and a `file`"):
        find_cases(tmp_path)


def test_identical_images_join_their_patients(tmp_path: Path) -> None:
    for name in ("IM-0001-0001.jpeg", "IM-0002-0001.jpeg", "IM-0003-0001.jpeg"):
        _touch(tmp_path / "NORMAL" / name)
    _touch(tmp_path / "PNEUMONIA" / "person1_virus_1.jpeg")
    cases = find_cases(tmp_path).cases
    groups = _union_patients(cases, ["d1", "d2", "d1", "d3"])
    assert groups[0] == groups[2] != groups[1]
    assert len(set(groups)) == 3
    # an unread file (no digest) joins nothing
    assert len(set(_union_patients(cases, ["", "", "", ""]))) == 4
    assert np.unique(groups).size == 3
