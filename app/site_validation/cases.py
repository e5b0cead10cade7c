"""A site's labelled cases, found in a folder: which files, which label, which patient, which
subgroups.

Two layouts:
- Kaggle style: `NORMAL/` and `PNEUMONIA/` (any case), each possibly with nested sub-folders whose
  path becomes the `folder` subgroup. Patients from a `manifest.csv` beside or above the folder
  (columns split, label, filename, patient_id), else from a DICOM file's PatientID, else from the
  Kermany file-name convention (`person123_bacteria_456.jpeg` -> person123, `IM-0011-0001.jpeg`
  -> IM-0011, `NORMAL2-IM-0383-0001.jpeg` -> NORMAL2-IM-0383), else the file itself.
- DICOM: any files under the folder plus `labels.csv` with a `file` (path relative to the folder)
  or `sop_instance_uid` column, a `label` column (NORMAL/PNEUMONIA, 0/1, negative/positive) and
  optionally `patient_id`; else the header's PatientID.

Raw patient ids stay in memory (`Case.patient`) for grouping; only salted hashes are ever written
out, and no header value is printed. Header subgroups are bounded categories: view position,
manufacturer (the most frequent few, the rest `other`), age band, sex.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from app.evaluation import kermany_patient

CLASSES = ("NORMAL", "PNEUMONIA")
LABELS_FILE = "labels.csv"
MANIFEST_FILE = "manifest.csv"
SIDECARS = frozenset({LABELS_FILE, MANIFEST_FILE})
MAX_FILES = 200_000
MAX_MANUFACTURERS = 6

_KERMANY_SUBTYPE = re.compile(r"^person\d+_(bacteria|virus)_", re.IGNORECASE)
_LABEL_WORDS = {
    "normal": False,
    "negative": False,
    "0": False,
    "pneumonia": True,
    "positive": True,
    "1": True,
}
_UID_COLUMNS = ("sop_instance_uid", "sopinstanceuid", "sop instance uid")


class CasesError(ValueError):
    """The folder is not a layout this tool reads, or its labels file is malformed."""


@dataclass
class Case:
    path: Path
    name: str  # path relative to the data folder, as written in the results
    positive: bool
    patient: str  # raw id, in memory only
    patient_source: str  # labels.csv | manifest | dicom | file name | file
    subgroups: dict[str, str] = field(default_factory=dict)


@dataclass
class Cases:
    kind: str  # kaggle | dicom
    cases: list[Case]
    notes: list[str]  # what was skipped or assumed, counts only


def find_cases(root: Path) -> Cases:
    """The labelled cases under `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise CasesError(f"{root} is not a folder")
    class_dirs = {p.name.upper(): p for p in root.iterdir() if p.is_dir()}
    if all(c in class_dirs for c in CLASSES):
        return _kaggle(root, class_dirs)
    if (root / LABELS_FILE).is_file():
        return _dicom_folder(root)
    raise CasesError(
        f"{root} has neither NORMAL/ and PNEUMONIA/ sub-folders nor a {LABELS_FILE}: see "
        "`pneumonia-validate-site --help` for the layouts it reads"
    )


def _files_under(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.name.lower() not in SIDECARS:
            files.append(path)
            if len(files) > MAX_FILES:
                raise CasesError(f"more than {MAX_FILES} files under {folder}")
    return files


def _kaggle(root: Path, class_dirs: dict[str, Path]) -> Cases:
    manifest = _manifest(root)
    cases: list[Case] = []
    for class_name in CLASSES:
        class_dir = class_dirs[class_name]
        for path in _files_under(class_dir):
            sub = path.parent.relative_to(class_dir).as_posix()
            subgroups = {"folder": sub} if sub != "." else {}
            subtype = _KERMANY_SUBTYPE.match(path.name)
            if subtype:
                subgroups["subtype"] = subtype.group(1).lower()
            header = read_header(path)
            if header is not None:
                subgroups.update(header.subgroups)
            patient, source = _kaggle_patient(path, class_name, manifest, header)
            name = path.relative_to(root).as_posix()
            cases.append(Case(path, name, class_name == "PNEUMONIA", patient, source, subgroups))
    if not cases:
        raise CasesError(f"no files under {root}/NORMAL or {root}/PNEUMONIA")
    _bound_manufacturers(cases)
    sources = Counter(c.patient_source for c in cases)
    notes = [f"patient ids: {n} images from {s}" for s, n in sorted(sources.items())]
    return Cases("kaggle", cases, notes)


def _manifest(root: Path) -> dict[tuple[str, str], str]:
    """(class, file name) -> patient id from a manifest.csv in `root` (any split) or in its parent
    (rows of the split named like `root`)."""
    for path, split in ((root / MANIFEST_FILE, None), (root.parent / MANIFEST_FILE, root.name)):
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"label", "filename", "patient_id"} <= set(reader.fieldnames or ()):
                continue
            return {
                (row["label"].upper(), row["filename"]): row["patient_id"]
                for row in reader
                if split is None or row.get("split") == split
            }
    return {}


def _kaggle_patient(
    path: Path, class_name: str, manifest: dict[tuple[str, str], str], header: Header | None
) -> tuple[str, str]:
    if (class_name, path.name) in manifest:
        return manifest[(class_name, path.name)], "manifest"
    if header is not None and header.patient_id:
        return "dicom:" + header.patient_id, "dicom"
    patient = kermany_patient(path.name)
    if patient is not None:
        return patient, "file name"
    return "file:" + str(path), "file"


def _dicom_folder(root: Path) -> Cases:
    rows = _labels(root / LABELS_FILE)
    by_file = {r.file: r for r in rows if r.file}
    by_uid = {r.uid: r for r in rows if r.uid}
    cases: list[Case] = []
    unlabelled = 0
    matched: set[int] = set()
    for path in _files_under(root):
        name = path.relative_to(root).as_posix()
        header = read_header(path)
        row = by_file.get(name) or by_file.get(path.name)
        if row is None and header is not None and header.sop_instance_uid:
            row = by_uid.get(header.sop_instance_uid)
        if row is None:
            unlabelled += 1
            continue
        matched.add(id(row))
        subgroups = dict(header.subgroups) if header else {}
        sub = path.parent.relative_to(root).as_posix()
        if sub != ".":
            subgroups["folder"] = sub
        if row.patient:
            patient, source = "labels:" + row.patient, "labels.csv"
        elif header is not None and header.patient_id:
            patient, source = "dicom:" + header.patient_id, "dicom"
        else:
            patient, source = "file:" + name, "file"
        cases.append(Case(path, name, row.positive, patient, source, subgroups))
    if not cases:
        raise CasesError(f"no file under {root} matches a row of {LABELS_FILE}")
    _bound_manufacturers(cases)
    notes = (
        [f"{unlabelled} files without a row in {LABELS_FILE} were left out"] if unlabelled else []
    )
    missing = len(rows) - len(matched)
    if missing:
        notes.append(f"{missing} rows of {LABELS_FILE} name no file in the folder")
    sources = Counter(c.patient_source for c in cases)
    notes += [f"patient ids: {n} images from {s}" for s, n in sorted(sources.items())]
    return Cases("dicom", cases, notes)


@dataclass(frozen=True)
class _LabelRow:
    file: str | None
    uid: str | None
    positive: bool
    patient: str | None


def _labels(path: Path) -> list[_LabelRow]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in reader.fieldnames or ()}
        file_col = columns.get("file")
        uid_col = next((columns[c] for c in _UID_COLUMNS if c in columns), None)
        label_col = columns.get("label")
        patient_col = columns.get("patient_id")
        if label_col is None or (file_col is None and uid_col is None):
            raise CasesError(
                f"{path} needs a `label` column and a `file` or `sop_instance_uid` column"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            word = (row.get(label_col) or "").strip().lower()
            if word not in _LABEL_WORDS:
                raise CasesError(
                    f"{path} line {line}: label must be one of NORMAL, PNEUMONIA, 0, 1, "
                    "negative, positive"
                )
            rows.append(
                _LabelRow(
                    (row.get(file_col) or "").strip() or None if file_col else None,
                    (row.get(uid_col) or "").strip() or None if uid_col else None,
                    _LABEL_WORDS[word],
                    (row.get(patient_col) or "").strip() or None if patient_col else None,
                )
            )
    if not rows:
        raise CasesError(f"{path} has no rows")
    return rows


@dataclass(frozen=True)
class Header:
    patient_id: str | None
    sop_instance_uid: str | None
    subgroups: dict[str, str]


def read_header(path: Path) -> Header | None:
    """The few header values this tool uses, or None when the file is not DICOM Part 10."""
    with path.open("rb") as fh:
        preamble = fh.read(132)
    if len(preamble) < 132 or preamble[128:132] != b"DICM":
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    subgroups = {
        "view position": _view(ds.get("ViewPosition")),
        "manufacturer": _manufacturer(ds.get("Manufacturer")),
        "age band": _age_band(ds),
        "sex": {"M": "male", "F": "female", "O": "other"}.get(
            str(ds.get("PatientSex") or "").strip().upper(), "not recorded"
        ),
    }
    patient = str(ds.get("PatientID") or "").strip() or None
    uid = str(ds.get("SOPInstanceUID") or "").strip() or None
    return Header(patient, uid, subgroups)


def _view(value: object) -> str:
    text = str(value or "").strip().upper()
    return text if text in ("AP", "PA") else ("not recorded" if not text else "other")


def _manufacturer(value: object) -> str:
    text = re.sub(r"[^A-Za-z0-9 .&-]", "", str(value or "")).strip()[:40]
    return text.upper() or "not recorded"


def _bound_manufacturers(cases: list[Case]) -> None:
    """Keep the most frequent few manufacturers; fold the rest (and rare ones) into `other`."""
    counts = Counter(c.subgroups["manufacturer"] for c in cases if "manufacturer" in c.subgroups)
    keep = {m for m, n in counts.most_common(MAX_MANUFACTURERS) if n >= 5 or m == "not recorded"}
    for case in cases:
        if "manufacturer" in case.subgroups and case.subgroups["manufacturer"] not in keep:
            case.subgroups["manufacturer"] = "other"


AGE_BANDS = ((0.0, 1.0, "under 1"), (1.0, 6.0, "1-5"), (6.0, 18.0, "6-17"), (18.0, 65.0, "18-64"))


def _age_band(ds: object) -> str:
    years = _age_years(ds)
    if years is None:
        return "not recorded"
    for low, high, name in AGE_BANDS:
        if low <= years < high:
            return name
    return "65 and over"


def _age_years(ds: object) -> float | None:
    age = str(getattr(ds, "PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", age)
    if match:
        per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
        return int(match.group(1)) / per_year
    birth = _dicom_date(getattr(ds, "PatientBirthDate", None))
    study = _dicom_date(getattr(ds, "StudyDate", None)) or _dicom_date(
        getattr(ds, "AcquisitionDate", None)
    )
    if birth and study and study >= birth:
        return (study - birth).days / 365.25
    return None


def _dicom_date(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
