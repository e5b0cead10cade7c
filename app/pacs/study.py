"""One verdict per study on the intake path: what has been read of each study, until it is quiet.

With `CXR_STUDY_STABLE_SECONDS` set, the spool readers of `app.pacs.pipeline` no longer make a
result per image. Each image received by C-STORE or STOW-RS is read as it comes (a frontal chest
image classified; a lateral, an image outside the model's intended use or one that cannot be read
set aside with the reason), and what was read is recorded here, in the study's ledger. Once no
image of a study has arrived for the stable time, and no image received before that time is still
waiting on the spool, the study is due: the pipeline makes its one result from the ledger (the
most positive frontal image decides, `app.pacs.objects.deciding_image`) and marks the ledger
rendered for that image set.

A resend of the same images leaves the image set, and so the result's UIDs and bytes, as they were:
nothing new is made or sent. Another image (a new frontal arriving later, an image sent again with
other pixel data) changes the set: the study is made again, under new instance UIDs in the same
result series.

Layout under the state directory (files mode 0600: the headers are patient data):

    studies/<Study Instance UID>.json    the study's ledger (atomic: temporary file, fsync, rename)
    studies/by-image/<SOP Instance UID>  the study an image belongs to (for `/results/{image}`)
    studies/waiting/<Study Instance UID> its image set has no result yet: what `due` reads, so
                                         that finding the quiet studies costs what the waiting
                                         ones cost, however many studies are kept

A ledger keeps each image's header without its pixels (DICOM JSON), so that a study made again
later can still describe the images read before. Ledgers untouched for `prune`'s age go.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from app.imaging.dicom.values import is_uid
from app.pacs.objects import STUDY_RULE, SetAsideImage, StudyImage, deciding_image
from app.pacs.uids import image_set_digest

_SUFFIX = ".json"


def _checked_uid(uid: str) -> str:
    # it names a file: digits and dots only
    if not is_uid(uid):
        raise ValueError("not a DICOM UID")
    return uid


@dataclass(frozen=True)
class ImageReading:
    """What became of one image of a study: read (`answer`, the JSON answer) or set aside
    (`set_aside`, the reason), with its content digest and header (no pixels, DICOM JSON)."""

    sop_instance_uid: str
    digest: str
    header: dict[str, Any]
    answer: dict[str, Any] | None = None
    set_aside: str | None = None

    def source(self) -> Dataset:
        """The header as a data set (what the result objects describe the image from)."""
        return Dataset.from_json(self.header)


@dataclass(frozen=True)
class StudyLedger:
    """One study's images as read so far."""

    study_instance_uid: str
    last_arrival: float
    images: dict[str, ImageReading]
    rendered: str | None

    @property
    def images_digest(self) -> str:
        """`app.pacs.uids.image_set_digest` of every image considered, read or set aside."""
        return image_set_digest({uid: r.digest for uid, r in self.images.items()})


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


class StudyLedgers:
    """The ledgers of the studies being read, in `root` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.by_image = self.root / "by-image"
        self.waiting = self.root / "waiting"
        for directory in (self.root, self.by_image, self.waiting):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (self.root, self.by_image, self.waiting):
            for leftover in directory.glob(".tmp-*"):
                leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()

    def _path(self, study_uid: str) -> Path:
        return self.root / f"{_checked_uid(study_uid)}{_SUFFIX}"

    def get(self, study_uid: str) -> StudyLedger | None:
        """The study's ledger, or None when nothing of it has been read (or it was pruned)."""
        try:
            document = json.loads(self._path(study_uid).read_bytes())
        except FileNotFoundError:
            return None
        return StudyLedger(
            study_instance_uid=study_uid,
            last_arrival=float(document["last_arrival"]),
            images={uid: ImageReading(**item) for uid, item in document["images"].items()},
            rendered=document.get("rendered"),
        )

    def _put(self, ledger: StudyLedger) -> None:
        document = {
            "last_arrival": ledger.last_arrival,
            "images": {uid: vars(r) for uid, r in ledger.images.items()},
            "rendered": ledger.rendered,
        }
        _write_atomic(
            self._path(ledger.study_instance_uid),
            json.dumps(document, separators=(",", ":"), sort_keys=True).encode(),
        )

    def reading(self, study_uid: str, sop_instance_uid: str) -> ImageReading | None:
        """What was recorded for an image of the study, if anything."""
        ledger = self.get(study_uid)
        return None if ledger is None else ledger.images.get(sop_instance_uid)

    def add(self, study_uid: str, reading: ImageReading, arrived_at: float) -> None:
        """Record an image (replacing what was recorded under its SOP Instance UID) that arrived
        at `arrived_at` (epoch seconds); durable when it returns."""
        uid = _checked_uid(reading.sop_instance_uid)
        with self._lock:
            ledger = self.get(study_uid) or StudyLedger(study_uid, arrived_at, {}, None)
            updated = StudyLedger(
                study_uid,
                max(ledger.last_arrival, arrived_at),
                {**ledger.images, uid: reading},
                ledger.rendered,
            )
            if updated.rendered != updated.images_digest:
                # marked before the ledger is written: a crash between leaves a mark too many
                # (`due` passes over a study already made), never one too few
                _write_atomic(self.waiting / study_uid, b"")
            self._put(updated)
            _write_atomic(self.by_image / uid, study_uid.encode("ascii"))

    def mark_rendered(self, study_uid: str, images_digest: str) -> None:
        """The study's result for the image set `images_digest` is in the outbox."""
        with self._lock:
            ledger = self.get(study_uid)
            if ledger is not None:
                self._put(StudyLedger(study_uid, ledger.last_arrival, ledger.images, images_digest))
                if ledger.images_digest == images_digest:
                    (self.waiting / study_uid).unlink(missing_ok=True)

    def study_of(self, sop_instance_uid: str) -> str | None:
        """The Study Instance UID recorded for an image, if any."""
        if not is_uid(sop_instance_uid):
            return None
        try:
            return (self.by_image / sop_instance_uid).read_text("ascii")
        except FileNotFoundError:
            return None

    def due(self, stable_s: float, now: float, oldest_unread: float | None) -> list[str]:
        """Studies whose image set has no result yet, quiet for `stable_s` seconds at `now`, with
        no image received before the end of that quiet time still unread (`oldest_unread`: when
        the oldest image on the spool arrived, None when none is). Oldest first."""
        found: list[tuple[float, str]] = []
        for path in self.waiting.iterdir():
            if not is_uid(path.name):  # a temporary file
                continue
            ledger = self.get(path.name)
            if ledger is None or ledger.rendered == ledger.images_digest:
                path.unlink(missing_ok=True)  # made, or pruned, since it was marked
                continue
            quiet_from = ledger.last_arrival + stable_s
            if now >= quiet_from and (oldest_unread is None or oldest_unread >= quiet_from):
                found.append((ledger.last_arrival, ledger.study_instance_uid))
        return [uid for _, uid in sorted(found)]

    def prune(self, older_than: float) -> int:
        """Forget the studies, already made, whose last image arrived before `older_than`."""
        removed = 0
        with self._lock:
            for path in self.root.glob(f"*{_SUFFIX}"):
                ledger = self.get(path.name.removesuffix(_SUFFIX))
                if ledger is None or ledger.last_arrival >= older_than:
                    continue
                if ledger.rendered != ledger.images_digest:
                    continue
                for uid in ledger.images:
                    link = self.by_image / uid
                    if self.study_of(uid) == ledger.study_instance_uid:
                        link.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                removed += 1
        return removed


STUDY_RULE_CODE = "most_positive_frontal_image"


def study_answer(
    study_uid: str,
    images: Sequence[StudyImage],
    set_aside: Sequence[SetAsideImage],
    decider_answer: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON a study's result is stored with (what `/results/...` gives as its `answer`): the
    deciding image's answer (label, probabilities, threshold, model, calibration, disclaimer),
    then the study: the rule, each image read with its own figures, each image set aside with
    the reason, and every warning of the answers read."""
    decider = deciding_image(images)
    warnings = dict.fromkeys(w for image in images for w in image.facts.warnings)
    answer = {
        key: decider_answer[key]
        for key in ("label", "probabilities", "threshold", "model", "calibration", "disclaimer")
        if key in decider_answer
    }
    return {
        **answer,
        "warnings": list(warnings),
        "dicom": {**(decider_answer.get("dicom") or {}), "study_instance_uid": study_uid},
        "study": {
            "study_instance_uid": study_uid,
            "rule": STUDY_RULE_CODE,
            "rule_text": STUDY_RULE,
            "deciding_sop_instance_uid": decider.sop_instance_uid,
            "images_read": [
                {
                    "sop_instance_uid": image.sop_instance_uid,
                    "label": image.facts.label,
                    "probabilities": image.facts.probabilities,
                    "threshold": image.facts.threshold,
                    "warnings": list(image.facts.warnings),
                }
                for image in sorted(images, key=lambda i: i.sop_instance_uid)
            ],
            "set_aside": [
                {"sop_instance_uid": item.sop_instance_uid, "reason": item.reason}
                for item in set_aside
            ],
        },
    }
