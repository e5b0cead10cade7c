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
# different SOP class must never reuse an instance UID); "sc": the heat-map Secondary Capture.
ObjectKind = Literal["sr", "sr-enhanced", "sc"]
OBJECT_KINDS: tuple[ObjectKind, ...] = ("sr", "sr-enhanced", "sc")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _uid_from(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(("pneumonia-result-uid", *parts)).encode("ascii")).digest()
    as_uuid = uuid.UUID(bytes=digest[:16])
    # version 8 and the RFC variant: a custom, name-derived UUID
    value = (as_uuid.int & ~(0xF << 76) | (0x8 << 76)) & ~(0x3 << 62) | (0x2 << 62)
    return f"2.25.{value}"


def _check(source_uid: str, model_sha256: str, site_profile_sha256: str | None = None) -> None:
    if not (_UID.match(source_uid) and len(source_uid) <= 64):
        raise ValueError("source UID is not a valid DICOM UID")
    if not _SHA256.match(model_sha256):
        raise ValueError("model_sha256 must be 64 lowercase hex digits")
    if site_profile_sha256 is not None and not _SHA256.match(site_profile_sha256):
        raise ValueError("site_profile_sha256 must be 64 lowercase hex digits")


def _reading(model_sha256: str, site_profile_sha256: str | None) -> tuple[str, ...]:
    """What made the finding: the model, and the site profile when one was applied."""
    if site_profile_sha256 is None:
        return (model_sha256,)
    return (model_sha256, "site-profile", site_profile_sha256)


def result_instance_uid(
    source_sop_instance_uid: str,
    model_sha256: str,
    kind: ObjectKind,
    site_profile_sha256: str | None = None,
) -> str:
    """SOP Instance UID of the `kind` result object for one source image read by one model (and
    site profile)."""
    _check(source_sop_instance_uid, model_sha256, site_profile_sha256)
    reading = _reading(model_sha256, site_profile_sha256)
    return _uid_from("instance", source_sop_instance_uid, *reading, kind)


def result_series_uid(
    source_sop_instance_uid: str,
    model_sha256: str,
    kind: ObjectKind,
    site_profile_sha256: str | None = None,
) -> str:
    """Series Instance UID of the series that holds the `kind` result for one source image."""
    _check(source_sop_instance_uid, model_sha256, site_profile_sha256)
    reading = _reading(model_sha256, site_profile_sha256)
    return _uid_from("series", source_sop_instance_uid, *reading, kind)


def device_uid(model_sha256: str) -> str:
    """Device UID of the processing algorithm (IHE AIR asks for a new one whenever the model
    changes; the ONNX file's sha256 changes exactly then)."""
    if not _SHA256.match(model_sha256):
        raise ValueError("model_sha256 must be 64 lowercase hex digits")
    return _uid_from("device", model_sha256)


def result_key(
    source_sop_instance_uid: str, model_sha256: str, site_profile_sha256: str | None = None
) -> str:
    """The outbox key of one answer: one source image read by one model (and site profile)."""
    _check(source_sop_instance_uid, model_sha256, site_profile_sha256)
    return "/".join((source_sop_instance_uid, *_reading(model_sha256, site_profile_sha256)))
