"""Datasets as lists of records, from a Kaggle-style directory or RSNA DICOM + labels CSV.

Both sources end up as the same `Record` list (one image, one binary label, one patient), so the
split, the cache and the pipeline never care where images came from.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from app.evaluation import kermany_patient, linked_groups

CLASSES = ("NORMAL", "PNEUMONIA")
# The class a screening answer is positive for (the metadata's decision.positive_class), and its
# column in labels, logits and probabilities.
POSITIVE_CLASS = "PNEUMONIA"
POSITIVE = CLASSES.index(POSITIVE_CLASS)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}


@dataclass(frozen=True)
class Record:
    path: str
    label: int  # index into CLASSES
    patient_id: str
    sha256: str = ""

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


def patient_from_filename(name: str) -> str:
    """Patient id encoded in a Kermany file name; the file stem when no pattern matches."""
    return kermany_patient(name) or Path(name).stem


def load_kaggle_directory(root: Path, split: str) -> list[Record]:
    """Records of `root/<split>/<CLASS>/*`, with patient ids from `root/manifest.csv` if present."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no '{split}' directory under {root}")
    manifest = _read_manifest(root / "manifest.csv", split)
    records = []
    for label, class_name in enumerate(CLASSES):
        class_dir = split_dir / class_name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"missing class directory {class_dir}")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            patient, sha = manifest.get(
                (class_name, path.name), (patient_from_filename(path.name), "")
            )
            records.append(Record(str(path), label, f"{class_name}/{patient}", sha))
    if not records:
        raise FileNotFoundError(f"no images under {split_dir}")
    return records


def _read_manifest(path: Path, split: str) -> dict[tuple[str, str], tuple[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {
            (row["label"], row["filename"]): (row["patient_id"], row.get("sha256", ""))
            for row in csv.DictReader(fh)
            if row["split"] == split
        }


def load_rsna(labels_csv: Path, image_dir: Path) -> list[Record]:
    """Records from the RSNA Pneumonia Detection format.

    `stage_2_train_labels.csv` has one row per bounding box (so several rows per positive patient)
    and one row with `Target` 0 for negatives; a patient is PNEUMONIA when any row says so. Images
    are `<patientId>.dcm` in `image_dir`. One image per patient, so the patient is the group.
    """
    targets: dict[str, int] = {}
    with Path(labels_csv).open(newline="") as fh:
        for row in csv.DictReader(fh):
            pid = row["patientId"].strip()
            targets[pid] = max(targets.get(pid, 0), int(float(row["Target"])))
    records = []
    missing = 0
    for pid in sorted(targets):
        path = Path(image_dir) / f"{pid}.dcm"
        if not path.is_file():
            missing += 1
            continue
        records.append(Record(str(path), targets[pid], f"rsna/{pid}"))
    if not records:
        raise FileNotFoundError(
            f"none of the {len(targets)} patients in {labels_csv} has a DICOM in {image_dir}"
        )
    if missing:
        print(f"[data] RSNA: {missing} labelled patients have no DICOM file and are skipped")
    return records


def split_by_patient(
    records: Sequence[Record], val_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Carve a validation set from `records` by patient, stratified by label.

    Images that are byte-identical (same sha256) are kept in one group with their patients, so a
    duplicate can never sit on both sides. Each group goes wholly to train or to validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    groups = _connected_groups(records)
    rng = random.Random(seed)
    train: list[Record] = []
    val: list[Record] = []
    for label in range(len(CLASSES)):
        label_groups = [g for g in groups if _majority_label(g) == label]
        label_groups.sort(key=lambda g: min(r.path for r in g))
        rng.shuffle(label_groups)
        target = val_fraction * sum(len(g) for g in label_groups)
        taken = 0
        for group in label_groups:
            if taken < target:
                val.extend(group)
                taken += len(group)
            else:
                train.extend(group)
    return sorted(train, key=lambda r: r.path), sorted(val, key=lambda r: r.path)


def _majority_label(group: Sequence[Record]) -> int:
    return round(float(np.mean([r.label for r in group])))


def _connected_groups(records: Iterable[Record]) -> list[list[Record]]:
    """Union-find over records sharing a patient id or an image hash."""
    records = list(records)
    groups = linked_groups(
        [[f"patient:{r.patient_id}", *([f"sha:{r.sha256}"] if r.sha256 else [])] for r in records]
    )
    grouped: dict[int, list[Record]] = defaultdict(list)
    for group, record in zip(groups, records, strict=True):
        grouped[group].append(record)
    return list(grouped.values())


def write_split(path: Path, splits: Mapping[str, Sequence[Record]]) -> str:
    """Write the split manifest CSV (split, label, patient, file) and return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "label", "patient_id", "path", "sha256"])
        for name, records in splits.items():
            for r in records:
                writer.writerow([name, r.class_name, r.patient_id, r.path, r.sha256])
    return file_sha256(path)


def read_split(path: Path) -> dict[str, list[Record]]:
    splits: dict[str, list[Record]] = defaultdict(list)
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            splits[row["split"]].append(
                Record(row["path"], CLASSES.index(row["label"]), row["patient_id"], row["sha256"])
            )
    return dict(splits)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def records_fingerprint(records: Sequence[Record]) -> str:
    """A hash of what the records are (file names, labels, patients), independent of location."""
    digest = hashlib.sha256()
    for r in sorted(records, key=lambda r: (r.label, Path(r.path).name)):
        digest.update(f"{r.label},{Path(r.path).name},{r.patient_id},{r.sha256}\n".encode())
    return digest.hexdigest()


def class_counts(records: Sequence[Record]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for r in records:
        counts[r.class_name] += 1
    return counts


def as_dicts(records: Sequence[Record]) -> list[dict[str, object]]:
    return [asdict(r) for r in records]
