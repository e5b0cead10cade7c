"""The HTTP face of DICOM networking: the STOW-RS origin endpoint hospitals push images to, and
the results routes (the stored answer with its delivery state, and the SR itself).

`POST /predict?deliver=true` is in `routes` with the other predictions; it uses `record_result`
from here. The work is in `app.pacs` (spool, STOW-RS core, outbox); these routes only route.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydicom.dataset import Dataset

from app.errors import (
    InvalidRequest,
    MalformedRequest,
    ResultNotFound,
    TooManyParts,
    UnsupportedMediaType,
)
from app.http import schemas
from app.http.auth import DELIVER, OPERATE, READ
from app.http.deps import FramingDep, PipelineDep, SettingsDep, StepDep, audit_read, require_role
from app.http.errors import error_responses
from app.http.slow_bodies import upload_ticket
from app.http.uploads import declared_upload_bytes, read_body
from app.imaging.formats import detect_format
from app.pacs import stow
from app.pacs.pipeline import ResultsPipeline
from app.serving.prediction import Prediction

router = APIRouter()

UidPath = Annotated[str, Path(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]

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
# One UID names at most a few results (one per image content read under it); the bound keeps a
# DELETE from looping should a look-up keep finding one.
_MOST_RESULTS_PER_UID = 100
_SR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/dicom": {}}, "description": "The SR (PS3.10)"},
    **error_responses(403, 404, 501, 503),
}


def require_dicom_upload(data: bytes) -> None:
    """`deliver=true` makes DICOM objects in the upload's study: it needs a DICOM upload."""
    fmt = detect_format(data)
    if fmt is None or fmt.name != "DICOM":
        raise InvalidRequest(
            "deliver=true needs a DICOM upload: the result objects go into the image's own "
            "study and patient, which a JPEG or PNG does not carry"
        )


async def record_result(
    pipeline: ResultsPipeline,
    data: bytes,
    answer: schemas.PredictionResponse,
    prediction: Prediction,
) -> schemas.PredictionResponse:
    """Store the answer's result objects (durably, before the answer goes out) and say so.

    The answer given is the stored one, the one its objects render: for an image already read
    (the same pixel data under the same UID, model and profile) that is the first answer, not
    this run's (a batched run may differ in the last digits), with this request's id and timings.
    """
    if prediction.dicom is None or prediction.dicom.sop_instance_uid is None:
        raise InvalidRequest("deliver=true needs a DICOM upload with a SOP Instance UID")
    recorded = await pipeline.record(data, answer.model_dump(mode="json"), prediction)
    stored = recorded.stored
    kept = schemas.PredictionResponse.model_validate(stored.result_json)
    info = schemas.result_info(
        recorded.source_sop_instance_uid, recorded.objects, stored.deliveries
    )
    return kept.model_copy(
        update={
            "request_id": answer.request_id,
            "timing_ms": answer.timing_ms,
            # a map asked for now, of the same pixels, when the stored answer has none
            "explanation": kept.explanation or answer.explanation,
            "result": info,
        }
    )


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


@router.get(
    "/results/{sop_instance_uid}",
    response_model=schemas.StoredResultResponse,
    responses=error_responses(403, 404, 501, 503),
    summary="A stored result and its delivery state",
    tags=["dicom"],
    dependencies=require_role(READ),
)
async def stored_result(
    request: Request, pipeline: PipelineDep, sop_instance_uid: UidPath
) -> schemas.StoredResultResponse:
    """The answer stored for a source image (by its SOP Instance UID, or by a result object's),
    with the result objects and their delivery state per destination. 404 when none is stored
    (never produced, refused as not a frontal chest X-ray, or purged after delivery)."""
    stored = await asyncio.to_thread(pipeline.result, sop_instance_uid)
    if stored is None:
        raise ResultNotFound("no result is stored for that SOP Instance UID")
    audit_read(request, sop_instance_uid)
    objects = await asyncio.to_thread(pipeline.outbox.objects, stored.result_key)
    source = str((stored.result_json.get("dicom") or {}).get("sop_instance_uid") or "")
    return schemas.StoredResultResponse(
        answer=stored.result_json,
        result=schemas.result_info(source, objects, stored.deliveries),
    )


@router.get(
    "/results/{sop_instance_uid}/sr",
    response_class=Response,
    responses=_SR_RESPONSES,
    summary="The DICOM SR of a result",
    tags=["dicom"],
    dependencies=require_role(READ),
)
async def stored_sr(request: Request, pipeline: PipelineDep, sop_instance_uid: UidPath) -> Response:
    """The TID 1500 Structured Report made for a source image, as a PS3.10 file."""
    payload = await asyncio.to_thread(pipeline.payload, sop_instance_uid, "sr")
    if payload is None:
        raise ResultNotFound("no result is stored for that SOP Instance UID")
    audit_read(request, sop_instance_uid)
    return Response(payload, media_type="application/dicom")


@router.delete(
    "/results/{sop_instance_uid}",
    response_model=schemas.DeletedResultResponse,
    responses=error_responses(403, 404, 501, 503),
    summary="Remove the stored results of an image now",
    tags=["dicom"],
    dependencies=require_role(OPERATE),
)
async def delete_result(
    pipeline: PipelineDep, sop_instance_uid: UidPath
) -> schemas.DeletedResultResponse:
    """Remove from the results store every result `GET /results/{SOPInstanceUID}` would give for
    this UID (a source image's, each image content read under it, or a result object's): the
    stored answer, its objects, and their deliveries, a pending one included (it is not sent).
    Needs an API key with the `operate` role (403 otherwise, and always when the service has no
    keys). What a PACS already received stays there. 404 when nothing is stored."""
    removed: list[str] = []
    results = 0
    while results < _MOST_RESULTS_PER_UID:
        stored = await asyncio.to_thread(pipeline.result, sop_instance_uid)
        if stored is None:
            break
        removed += await asyncio.to_thread(pipeline.outbox.delete_result, stored.result_key)
        results += 1
    if not results:
        raise ResultNotFound("no result is stored for that SOP Instance UID")
    return schemas.DeletedResultResponse(
        sop_instance_uid=sop_instance_uid, results_removed=results, objects_removed=removed
    )
