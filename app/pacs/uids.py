"""Deterministic UIDs for result objects.

A result object's UID is a function of what it renders: the source image, the model that read it
(by the sha256 of its ONNX file), the site profile whose recalibration and threshold made the
label, if one was loaded (by the sha256 of its canonical JSON), and the kind of object. Re-sending
the same image to the same model and profile therefore yields the same SOP Instance UID (and, the
objects carrying no clock, the same bytes), so a PACS that already holds the result keeps one copy
instead of gaining a second SR; a new model version or a new site profile yields new UIDs, side by
side, since one UID must never name two different findings. Without a site profile the UIDs are
what they were before profiles existed.

The UIDs are in the `2.25` arc (ISO/IEC 9834-8: the decimal integer of a UUID). The UUID is the
first 16 bytes of a sha256 over the inputs, with the RFC 9562 version 8 ("custom") and variant
bits set, so that the integer is a well-formed UUID and the UID stays under 64 characters.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Literal

# "sr": Comprehensive 3D SR; "sr-enhanced": the Enhanced SR fallback for peers without 88.34 (a
# different SOP class must never reuse an instance UID); "sc": the heat-map Secondary Capture;
# "gsps": the Grayscale Softcopy Presentation State of the attention region.
ObjectKind = Literal["sr", "sr-enhanced", "sc", "gsps"]
OBJECT_KINDS: tuple[ObjectKind, ...] = ("sr", "sr-enhanced", "sc", "gsps")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _uid_from(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(("pneumonia-result-uid", *parts)).encode("ascii")).digest()
    as_uuid = uuid.UUID(bytes=digest[:16])
    # version 8 and the RFC variant: a custom, name-derived UUID
    value = (as_uuid.int & ~(0xF << 76) | (0x8 << 76)) & ~(0x3 << 62) | (0x2 << 62)
    return f"2.25.{value}"


def _check(
    source_uid: str,
    model_sha256: str,
    site_profile_sha256: str | None = None,
    pixel_digest: str | None = None,
) -> None:
    if not (_UID.match(source_uid) and len(source_uid) <= 64):
        raise ValueError("source UID is not a valid DICOM UID")
    if not _SHA256.match(model_sha256):
        raise ValueError("model_sha256 must be 64 lowercase hex digits")
    if site_profile_sha256 is not None and not _SHA256.match(site_profile_sha256):
        raise ValueError("site_profile_sha256 must be 64 lowercase hex digits")
    if pixel_digest is not None and not _SHA256.match(pixel_digest):
        raise ValueError("pixel_digest must be 64 lowercase hex digits")


def _reading(
    model_sha256: str, site_profile_sha256: str | None, pixel_digest: str | None = None
) -> tuple[str, ...]:
    """What made the finding: the model, the site profile when one was applied, and the pixel
    data that was read, when given."""
    reading: tuple[str, ...] = (model_sha256,)
    if site_profile_sha256 is not None:
        reading += ("site-profile", site_profile_sha256)
    if pixel_digest is not None:
        reading += ("pixels", pixel_digest)
    return reading


def pixel_data_digest(pixel_data: bytes) -> str:
    """The sha256 of a source's Pixel Data (7FE0,0010) value as it was sent (native or
    encapsulated): the content that joins the result's key and UIDs."""
    return hashlib.sha256(pixel_data).hexdigest()


def result_instance_uid(
    source_sop_instance_uid: str,
    model_sha256: str,
    kind: ObjectKind,
    site_profile_sha256: str | None = None,
    pixel_digest: str | None = None,
) -> str:
    """SOP Instance UID of the `kind` result object for one source image read by one model (and
    site profile)."""
    _check(source_sop_instance_uid, model_sha256, site_profile_sha256, pixel_digest)
    reading = _reading(model_sha256, site_profile_sha256, pixel_digest)
    return _uid_from("instance", source_sop_instance_uid, *reading, kind)


def result_series_uid(
    source_sop_instance_uid: str,
    model_sha256: str,
    kind: ObjectKind,
    site_profile_sha256: str | None = None,
    pixel_digest: str | None = None,
) -> str:
    """Series Instance UID of the series that holds the `kind` result for one source image."""
    _check(source_sop_instance_uid, model_sha256, site_profile_sha256, pixel_digest)
    reading = _reading(model_sha256, site_profile_sha256, pixel_digest)
    return _uid_from("series", source_sop_instance_uid, *reading, kind)


def device_uid(model_sha256: str) -> str:
    """Device UID of the processing algorithm (IHE AIR asks for a new one whenever the model
    changes; the ONNX file's sha256 changes exactly then)."""
    if not _SHA256.match(model_sha256):
        raise ValueError("model_sha256 must be 64 lowercase hex digits")
    return _uid_from("device", model_sha256)


def result_key(
    source_sop_instance_uid: str,
    model_sha256: str,
    site_profile_sha256: str | None = None,
    pixel_digest: str | None = None,
) -> str:
    """The outbox key of one answer: one source image (its UID and, when given, its pixel data)
    read by one model (and site profile)."""
    _check(source_sop_instance_uid, model_sha256, site_profile_sha256, pixel_digest)
    reading = _reading(model_sha256, site_profile_sha256, pixel_digest)
    return "/".join((source_sop_instance_uid, *reading))


def result_key_prefix(
    source_sop_instance_uid: str, model_sha256: str, site_profile_sha256: str | None = None
) -> str:
    """What every content-keyed result of one source UID under one reading starts with."""
    return result_key(source_sop_instance_uid, model_sha256, site_profile_sha256) + "/pixels/"


# -- study-level results ------------------------------------------------------------------------
# One result for a study (`app.pacs.study`): its UIDs come from the Study Instance UID, the reading
# (model, site profile) and, for the instance, the digest of the image set it was made from, so
# that the same images give the same SR and another set another one, in the same series.


def image_set_digest(images: dict[str, str]) -> str:
    """The sha256 naming a study's image set: every image considered (used or set aside), by SOP
    Instance UID and content digest, in UID order."""
    lines = "\n".join(f"{uid} {digest}" for uid, digest in sorted(images.items()))
    return hashlib.sha256(lines.encode("ascii")).hexdigest()


def study_result_instance_uid(
    study_instance_uid: str,
    model_sha256: str,
    kind: ObjectKind,
    site_profile_sha256: str | None,
    images_digest: str,
) -> str:
    """SOP Instance UID of a study's `kind` result made from one image set."""
    _check(study_instance_uid, model_sha256, site_profile_sha256, images_digest)
    reading = _reading(model_sha256, site_profile_sha256)
    return _uid_from("study-instance", study_instance_uid, *reading, "images", images_digest, kind)


def study_image_result_instance_uid(
    study_instance_uid: str,
    model_sha256: str,
    kind: ObjectKind,
    site_profile_sha256: str | None,
    images_digest: str,
    image_sop_instance_uid: str,
) -> str:
    """SOP Instance UID of a study's `kind` result about one of its images (the GSPS of an
    image's attention region), made from one image set."""
    _check(study_instance_uid, model_sha256, site_profile_sha256, images_digest)
    _check(image_sop_instance_uid, model_sha256)
    reading = _reading(model_sha256, site_profile_sha256)
    return _uid_from(
        "study-instance",
        study_instance_uid,
        *reading,
        "images",
        images_digest,
        "image",
        image_sop_instance_uid,
        kind,
    )


def study_result_series_uid(
    study_instance_uid: str, model_sha256: str, kind: ObjectKind, site_profile_sha256: str | None
) -> str:
    """Series Instance UID of a study's `kind` results under one reading, whatever the image
    set: a result made again for a changed set joins the same series."""
    _check(study_instance_uid, model_sha256, site_profile_sha256)
    reading = _reading(model_sha256, site_profile_sha256)
    return _uid_from("study-series", study_instance_uid, *reading, kind)


def study_result_key_prefix(
    study_instance_uid: str, model_sha256: str, site_profile_sha256: str | None = None
) -> str:
    """What the outbox keys of one study's results under one reading start with."""
    _check(study_instance_uid, model_sha256, site_profile_sha256)
    reading = _reading(model_sha256, site_profile_sha256)
    return "/".join(("study", study_instance_uid, *reading, "images", ""))


def study_result_key(
    study_instance_uid: str,
    model_sha256: str,
    site_profile_sha256: str | None,
    images_digest: str,
) -> str:
    """The outbox key of a study's result made from one image set."""
    _check(study_instance_uid, model_sha256, site_profile_sha256, images_digest)
    return study_result_key_prefix(study_instance_uid, model_sha256, site_profile_sha256) + (
        images_digest
    )
