"""The results routes: the answer stored for an image with its delivery state
(`/results/{uid}`), its SR (`/results/{uid}/sr`) and their removal; and `record_result`, which
`POST /predict?deliver=true` (in `routes`) stores its answer with.

The work is in `app.pacs` (the pipeline and its outbox); these routes only route.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from app.errors import InvalidRequest, ResultNotFound
from app.http import schemas
from app.http.auth import OPERATE, READ
from app.http.deps import PipelineDep, audit_read, require_role
from app.http.errors import error_responses
from app.imaging.formats import detect_format
from app.pacs.pipeline import ResultsPipeline
from app.serving.prediction import Prediction

router = APIRouter()

# A DICOM UID in a path: the result's (or a study's, in `app.http.dicomweb`).
UidPath = Annotated[str, Path(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]

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
