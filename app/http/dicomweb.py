"""DICOMweb STOW-RS: the origin endpoint (`/dicomweb/studies`) hospitals push images to.

The work is in `app.pacs` (the STOW-RS core, the spool, the pipeline's readers); these routes only
route. Each stored instance's result is read at `/results/{uid}` (`app.http.results`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from pydicom.dataset import Dataset

from app.errors import MalformedRequest, TooManyParts, UnsupportedMediaType
from app.http.auth import DELIVER
from app.http.deps import FramingDep, PipelineDep, SettingsDep, StepDep, require_role
from app.http.errors import error_responses
from app.http.results import UidPath
from app.http.slow_bodies import upload_ticket
from app.http.uploads import declared_upload_bytes, read_body
from app.pacs import stow
from app.pacs.pipeline import ResultsPipeline

router = APIRouter()

DICOM_JSON = "application/dicom+json"
_STOW_BODY = {
    "requestBody": {
        "required": True,
        "description": 'PS3.10 instances, one per part: `multipart/related; type="application/'
        'dicom"; boundary=...` (quoted or unquoted boundary; chunked bodies are read too), at '
        "most `CXR_MAX_UPLOAD_BYTES` in all.",
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }
}
_STORE_RESPONSE: dict[str, Any] = {
    "description": "Store Instances Response (PS3.18 Annex I) in DICOM JSON: "
    "ReferencedSOPSequence (00081199) lists the accepted instances, each with a RetrieveURL of "
    "its result; FailedSOPSequence (00081198) the others with a FailureReason (0x0122 not a "
    "frontal chest CR/DX, 0xA901 another study than the path's, 0xC000 unreadable, 0xA700 the "
    "intake is full).",
    "content": {DICOM_JSON: {}},
}

_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _STORE_RESPONSE,
    202: _STORE_RESPONSE,
    409: _STORE_RESPONSE,
    **error_responses(400, 403, 413, 415, 501, 503),
}


@router.post(
    "/dicomweb/studies",
    status_code=200,
    responses=_STOW_RESPONSES,
    openapi_extra=_STOW_BODY,
    summary="Store instances (DICOMweb STOW-RS)",
    tags=["dicom"],
    dependencies=require_role(DELIVER),
)
async def store_instances(
    request: Request,
    step: StepDep,
    pipeline: PipelineDep,
    settings: SettingsDep,
    framing: FramingDep,
) -> Response:
    """STOW-RS origin server (PS3.18 §10.5): each frontal chest CR/DX instance is written to the
    durable intake spool before it is listed as stored, then classified by the service's own
    workers; its result objects go to the configured destinations and are readable at
    `/results/{SOPInstanceUID}`. 200: all stored; 202: some failed; 409: none stored; 400:
    broken multipart framing; 413: over `CXR_MAX_UPLOAD_BYTES`, or more than
    `CXR_STOW_MAX_PARTS` parts (`too_many_parts`, refused whole); 403: the key lacks the `deliver`
    role; 415: not `multipart/related; type="application/dicom"`; 503 with Retry-After: the
    intake is full, or the results store (`results_store_full`)."""
    return await _store(request, step, pipeline, settings, framing, None)


@router.post(
    "/dicomweb/studies/{study}",
    status_code=200,
    responses=_STOW_RESPONSES,
    openapi_extra=_STOW_BODY,
    summary="Store instances of one study (DICOMweb STOW-RS)",
    tags=["dicom"],
    dependencies=require_role(DELIVER),
)
async def store_study_instances(
    request: Request,
    step: StepDep,
    pipeline: PipelineDep,
    settings: SettingsDep,
    framing: FramingDep,
    study: UidPath,
) -> Response:
    """As `POST /dicomweb/studies`; an instance of another study fails with 0xA901."""
    return await _store(request, step, pipeline, settings, framing, study)


async def _store(
    request: Request,
    step: StepDep,
    pipeline: ResultsPipeline,
    settings: SettingsDep,
    framing: FramingDep,
    study: str | None,
) -> Response:
    content_type = request.headers.get("content-type", "")
    try:
        stow.parse_content_type(content_type)  # 415/400 before the body is read
    except stow.StowError as exc:
        raise _as_service_error(exc) from exc
    declared = declared_upload_bytes(framing, settings.max_upload_bytes)
    # A full results store refuses before the body is read: an image taken now would be read
    # later into nowhere.
    await asyncio.to_thread(pipeline.outbox.require_room)
    # Through the admission gate the body's bytes are charged as they arrive, not declared.
    with step.admit(1, 0 if upload_ticket(request) is not None else declared):
        body = await read_body(request, framing, settings.max_upload_bytes)
    base = str(request.base_url).rstrip("/")

    def instance_url(_study: str, _series: str, instance: str) -> str:
        return f"{base}/results/{instance}"

    accept = stow.spool_accept(pipeline.spool)

    def accept_and_wake(ds: Dataset, data: bytes) -> None:
        accept(ds, data)
        pipeline.spooled()

    try:
        answer = await asyncio.to_thread(
            stow.store_instances,
            body,
            content_type,
            gate=pipeline.gate,
            accept=accept_and_wake,
            study=study,
            study_url=f"{base}/dicomweb/studies/{study}" if study else None,
            instance_url=instance_url,
            max_parts=settings.stow_max_parts,
        )
    except stow.StowError as exc:
        raise _as_service_error(exc) from exc
    finally:
        del body
    for outcome in answer.outcomes:
        pipeline.stats[f"stow:{outcome.detail}"] += 1
    headers = dict(answer.headers)
    if "Retry-After" in headers:  # the service's one Retry-After
        headers["Retry-After"] = str(settings.retry_after_s)
    return Response(answer.body, status_code=answer.status, headers=headers, media_type=DICOM_JSON)


def _as_service_error(exc: stow.StowError) -> Exception:
    if isinstance(exc, stow.UnsupportedMediaType):
        return UnsupportedMediaType(str(exc))
    if isinstance(exc, stow.TooManyParts):
        return TooManyParts(str(exc))
    return MalformedRequest(str(exc))
