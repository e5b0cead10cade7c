"""Dataset loading and the patient-level split."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    Record,
    load_kaggle_directory,
    load_rsna,
    patient_from_filename,
    read_split,
    split_by_patient,
    write_split,
)


def _records(n_patients: int, images_per_patient: int = 3) -> list[Record]:
    rng = np.random.default_rng(0)
    out = []
    for p in range(n_patients):
        label = int(rng.random() < 0.7)
        for i in range(images_per_patient):
            out.append(Record(f"/d/p{p}_{i}.jpeg", label, f"patient{p}", f"sha{p}_{i}"))
    return out


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1365_virus_2351.jpeg", "person1365"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
        ("odd.png", "odd"),
    ],
)
def test_patient_from_kermany_filenames(name: str, patient: str) -> None:
    assert patient_from_filename(name) == patient


def test_no_patient_on_both_sides_of_the_split() -> None:
    records = _records(200)
    train, val = split_by_patient(records, 0.2, seed=7)
    assert {r.patient_id for r in train}.isdisjoint({r.patient_id for r in val})
    assert len(train) + len(val) == len(records)
    assert 0.15 < len(val) / len(records) < 0.25
    # stratified: both classes are present in validation in roughly the overall proportion
    overall = np.mean([r.label for r in records])
    assert abs(np.mean([r.label for r in val]) - overall) < 0.1


def test_split_is_seeded() -> None:
    records = _records(100)
    assert split_by_patient(records, 0.2, 1) == split_by_patient(records, 0.2, 1)
    assert split_by_patient(records, 0.2, 1) != split_by_patient(records, 0.2, 2)


def test_identical_images_of_different_patients_stay_together() -> None:
    records = _records(60, images_per_patient=1)
    # patient 0's image is byte-identical to patient 1's
    records[1] = Record(records[1].path, records[0].label, records[1].patient_id, records[0].sha256)
    for seed in range(20):
        train, val = split_by_patient(records, 0.3, seed)
        sides = {r.patient_id: "val" for r in val} | {r.patient_id: "train" for r in train}
        assert sides["patient0"] == sides["patient1"]


def test_split_manifest_round_trips(tmp_path: Path) -> None:
    train, val = split_by_patient(_records(30), 0.2, 0)
    digest = write_split(tmp_path / "split.csv", {"train": train, "val": val})
    assert len(digest) == 64
    assert read_split(tmp_path / "split.csv") == {"train": train, "val": val}


def _write_kaggle(root: Path) -> None:
    for split in ("train", "test"):
        for cls, names in (
            ("NORMAL", ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg"]),
            ("PNEUMONIA", ["person3_virus_1.jpeg"]),
        ):
            d = root / split / cls
            d.mkdir(parents=True)
            for n in names:
                Image.new("L", (80, 80), 100).save(d / n)
            (d / "notes.txt").write_text("not an image")


def test_kaggle_directory_labels_and_patients(tmp_path: Path) -> None:
    _write_kaggle(tmp_path)
    records = load_kaggle_directory(tmp_path, "train")
    assert [(Path(r.path).name, r.class_name, r.patient_id) for r in records] == [
        ("IM-0001-0001.jpeg", "NORMAL", "NORMAL/IM-0001"),
        ("IM-0001-0002.jpeg", "NORMAL", "NORMAL/IM-0001"),
        ("person3_virus_1.jpeg", "PNEUMONIA", "PNEUMONIA/person3"),
    ]


def test_kaggle_manifest_overrides_filename_patients(tmp_path: Path) -> None:
    _write_kaggle(tmp_path)
    with (tmp_path / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "label", "filename", "patient_id", "subtype", "sha256"])
        w.writerow(["train", "PNEUMONIA", "person3_virus_1.jpeg", "person99", "virus", "ab" * 32])
    rec = next(r for r in load_kaggle_directory(tmp_path, "train") if r.label == 1)
    assert (rec.patient_id, rec.sha256) == ("PNEUMONIA/person99", "ab" * 32)


def test_kaggle_directory_missing_split_is_an_error(tmp_path: Path) -> None:
    _write_kaggle(tmp_path)
    with pytest.raises(FileNotFoundError, match="val"):
        load_kaggle_directory(tmp_path, "val")


def _write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra: object
) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_rsna_loader_merges_box_rows_per_patient(tmp_path: Path) -> None:
    images = tmp_path / "stage_2_train_images"
    images.mkdir()
    rows = [
        ("pos-a", 10, 10, 50, 50, 1),
        ("pos-a", 60, 20, 40, 40, 1),  # second box of the same patient
        ("neg-b", "", "", "", "", 0),
        ("pos-c", 5, 5, 20, 20, 1),
        ("no-image", "", "", "", "", 0),
    ]
    with (tmp_path / "stage_2_train_labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        w.writerows(rows)
    ramp = (np.arange(96 * 96).reshape(96, 96) % 4096).astype(np.uint16)
    for pid in ("pos-a", "neg-b", "pos-c"):
        _write_dicom(images / f"{pid}.dcm", ramp)

    records = load_rsna(tmp_path / "stage_2_train_labels.csv", images)
    assert [(r.patient_id, r.label) for r in records] == [
        ("rsna/neg-b", 0),
        ("rsna/pos-a", 1),
        ("rsna/pos-c", 1),
    ]
    train, val = split_by_patient(records, 0.34, 0)
    assert {r.patient_id for r in train}.isdisjoint({r.patient_id for r in val})


def test_dicom_monochrome1_is_inverted_and_rescaled(tmp_path: Path) -> None:
    from training.preprocessing import DEFAULT_PREPROCESSING, load_image

    ramp = np.tile(np.linspace(0, 4000, 128).astype(np.uint16), (128, 1))
    _write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2")
    _write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1")
    m2 = load_image(tmp_path / "m2.dcm", DEFAULT_PREPROCESSING)[..., 0]
    m1 = load_image(tmp_path / "m1.dcm", DEFAULT_PREPROCESSING)[..., 0]
    assert m2.shape == (224, 224)
    assert m2[:, 0].mean() < 5 and m2[:, -1].mean() > 250  # 12-bit range stretched to 8 bits
    assert np.array_equal(m1, 255 - m2)
