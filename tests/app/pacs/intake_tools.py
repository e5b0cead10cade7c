"""Shared pieces of the intake tests: a header gate, test instances with their own UIDs, loopback
ports, and the rule for system tools (skip here, fail under CI)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from app.testing import dicom_files as factory
from tests.app.pacs.pacs_servers import require_tool as _require_tool

LOOPBACK = "127.0.0.1"
CR_STORAGE = factory.CR_STORAGE
DX_STORAGE = factory.DX_STORAGE
_UID_ROOT = "1.2.826.0.1.3680043.10.1001.9."


def chest_gate(ds: Dataset) -> str | None:
    """The intended-use rule of the shipped model, from the header: frontal chest CR/DX."""
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    view = str(ds.get("ViewPosition", "") or "").upper()
    if modality not in ("CR", "DX") or sop_class not in (CR_STORAGE, DX_STORAGE):
        return "not_intended_use"
    if body_part and body_part != "CHEST":
        return "not_intended_use"
    if view in ("LL", "RL", "LATERAL", "LAT"):
        return "not_intended_use"
    return None


def unique_uid(*parts: int) -> str:
    return _UID_ROOT + ".".join(str(p) for p in parts)


def instance(
    syntax: str = "explicit_le",
    *,
    sop_instance_uid: str,
    study_uid: str = factory.STUDY_UID,
    stored: np.ndarray | None = None,
    **options: Any,
) -> bytes:
    """A Part-10 file from the test factory, with its own SOP Instance UID (and study)."""
    options.setdefault("modality", "CR")
    options.setdefault("sop_class", CR_STORAGE)
    ds = factory.make_dataset(factory.ramp() if stored is None else stored, **options)
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    return factory.encode_dataset(ds, syntax)


def require_tool(name: str) -> str:
    """The path of a system tool; a missing one skips the test, or fails it under CI."""
    return _require_tool(name, "dcmtk / orthanc")


def run_tool(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def storescu_config(path: Path, syntaxes: dict[str, str]) -> Path:
    """A storescu configuration with one profile per transfer syntax (`-xf path NAME`), each
    proposing CR and DX-For-Presentation with that syntax only: the sender cannot fall back to
    converting the file, so a stored image proves the syntax travelled as it is."""
    lines = ["[[TransferSyntaxes]]"]
    for name, uid in syntaxes.items():
        lines += [f"[TS_{name}]", f"TransferSyntax1 = {uid}"]
    lines.append("[[PresentationContexts]]")
    for name in syntaxes:
        lines += [
            f"[PC_{name}]",
            f"PresentationContext1 = {CR_STORAGE}\\TS_{name}",
            f"PresentationContext2 = {DX_STORAGE}\\TS_{name}",
        ]
    lines.append("[[Profiles]]")
    for name in syntaxes:
        lines += [f"[{name.upper()}]", f"PresentationContexts = PC_{name}"]
    path.write_text("\n".join(lines) + "\n")
    return path
