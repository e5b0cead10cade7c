"""HTTP routes. They only route: read the body (`uploads`), hand each image to the prediction
step (`app.serving.prediction`: admission, decode in a worker thread, the model in the batching
engine), and shape the answer (`schemas`). Dependencies live in `deps`, the error shape in
`errors`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request, Response

from app.errors import ModelNotReady, ServiceError
from app.http import schemas
from app.http.auth import DELIVER, PREDICT
from app.http.deps import (
    REQUIRE_API_KEY,
    ClassifierDep,
    ContextDep,
    DeadlineDep,
    FramingDep,
    MetricsDep,
    OptionalPipelineDep,
    ServiceStateDep,
    SettingsDep,
    StepDep,
    demand_role,
    get_pipeline,
    require_role,
)
from app.http.errors import error_responses
from app.http.results import record_result, require_dicom_upload
from app.http.schemas import (
    BatchPredictionResponse,
    LiveResponse,
    ModelInfo,
    PredictionResponse,
    ReadyResponse,
)
from app.http.slow_bodies import held_upload
from app.http.uploads import (
    FILE_FIELD,
    RAW_CONTENT_TYPES,
    declared_upload_bytes,
    read_upload,
    read_upload_parts,
)
from app.ops.metrics import METRICS_CONTENT_TYPE
from app.serving.prediction import Prediction
from app.serving.timing import RequestTimer

T = TypeVar("T")

logger = logging.getLogger(__name__)

# How long an upload whose body has arrived may wait for an image slot (the gate let it in when
# there was room; in the meantime others took it) before it gets its 429.
SLOT_WAIT_S = 1.0

router = APIRouter()


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "A frontal chest X-ray: JPEG, PNG or DICOM Part 10 (CR/DX). The format "
        "is detected from the bytes; the declared type and file name are ignored.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                    "required": [FILE_FIELD],
                }
            },
            **{media: _BINARY for media in sorted(RAW_CONTENT_TYPES)},
        },
    }
}


_PREDICT_ERRORS = error_responses(403, 408, 413, 415, 422, 429, 501, 503)


@router.post(
    "/predict",
    response_model=PredictionResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Screen one chest X-ray for pneumonia",
    tags=["inference"],
    dependencies=require_role(PREDICT),
)
async def predict(
    request: Request,
    step: StepDep,
    settings: SettingsDep,
    context: ContextDep,
    framing: FramingDep,
    deadline: DeadlineDep,
    explain: Annotated[
        bool,
        Query(
            description="Also return a class activation map (`explanation`): where the model "
            "found the evidence. Costs a few milliseconds and about 100 KB of response."
        ),
    ] = False,
    explain_class: Annotated[
        str | None,
        Query(
            description="The class to explain, one of the model's classes (`GET /model` lists "
            "them; the enum here is the served model's); by default the answer's label."
        ),
    ] = None,
    deliver: Annotated[
        bool,
        Query(
            description="DICOM uploads only: also make the result objects (a TID 1500 SR in the "
            "image's study, and the heat-map SC where configured), store them durably before "
            "answering, and deliver them to the configured PACS; the answer carries `result`. "
            "A JPEG/PNG gets 422; an instance without CXR_STATE_DIR 501; a key without the "
            "`deliver` role 403."
        ),
    ] = False,
) -> PredictionResponse:
    """Classify one frontal chest X-ray as NORMAL or PNEUMONIA (research use only).

    Send the image as the multipart form field `file`, or as the raw request body with
    `Content-Type: image/jpeg | image/png | application/dicom | application/octet-stream`.
    JPEG and PNG are accepted in any bit depth and colour mode, with EXIF orientation applied.

    DICOM Part 10 files are accepted when they are what the model was made for: Modality CR or DX
    (CR Image Storage, DX Image Storage for Presentation), one frame of MONOCHROME1/2 integer
    pixels, a Body Part Examined (if present) of CHEST, and no lateral View Position. Every common
    transfer syntax decodes (implicit/explicit VR little endian, explicit big endian, deflated, RLE,
    JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000). The image is rendered as a viewer shows
    it (modality LUT, the file's first window or VOI LUT, MONOCHROME1 inverted), by the rule in the
    model's metadata. The response then carries `dicom` (the study, series and SOP instance UIDs,
    modality, view position, the window applied) and, for a patient outside the training
    population, a `warnings` entry.

    `label` applies the model's validated operating threshold to the calibrated probability of
    the positive class. An optional `X-Request-Timeout-Ms` header bounds how long the image may
    wait for the model. Errors: 408 `upload_too_slow` (the body arrived under
    `CXR_UPLOAD_MIN_BYTES_PER_S`), 413 upload too large, 415 unsupported format, 422 undecodable /
    too small / too many pixels / `not_intended_use` (another modality, body part or view,
    multi-frame, colour, no pixel data) / `explanation_unavailable`, 429 `overloaded` (the service
    is full: retry after `Retry-After` seconds; answered from the headers, the connection closed),
    503 model not ready, or `deadline_exceeded` (with `Retry-After`).

    With a site profile (`CXR_SITE_PROFILE`) the label applies the site's threshold to the site's
    recalibration of that probability instead, and the answer says so in `calibration`.

    With `explain=true` the answer also carries `explanation`: the class activation map of the
    label (or of `explain_class`), exact for this model, as a grid and as PNG pictures (the input,
    the coloured map, and the two overlaid). Default answers do not compute it.
    """
    step.check_explanation_request(explain, explain_class)  # before the body is read
    if deliver:
        demand_role(request, DELIVER)  # writing into the PACS is a right of its own
    results = await get_pipeline(request, step) if deliver else None
    explain = explain or (results is not None and results.explains)
    if results is not None and explain_class is None:
        explain_class = results.explain_class  # the heat map's class (the positive one), or None
    timer = context.timer
    declared_upload_bytes(framing, settings.max_upload_bytes)  # 413 before the body is read
    with held_upload(request, step.admission) as ticket:
        reading = read_upload(request, framing, settings.max_upload_bytes)
        data = await _timed_read(timer, reading)
        await ticket.take_image(SLOT_WAIT_S)
        if results is not None:
            require_dicom_upload(data)
        prediction = await step.predict(data, deadline, explain, explain_class, timer)
    answer = schemas.prediction_response(
        prediction, step.classifier, context.request_id, timer.finish()
    )
    if results is None:
        return answer
    return await record_result(results, data, answer, prediction)


_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "1 to `CXR_MAX_IMAGES_PER_REQUEST` chest X-rays as repeated multipart "
        f"fields named `{FILE_FIELD}` (JPEG, PNG or DICOM, detected from the bytes).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FILE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                    "required": [FILE_FIELD],
                }
            }
        },
    }
}


@router.post(
    "/predict/batch",
    response_model=BatchPredictionResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_BATCH_BODY,
    summary="Screen several chest X-rays in one request",
    tags=["inference"],
    dependencies=require_role(PREDICT),
)
async def predict_batch(
    request: Request,
    step: StepDep,
    settings: SettingsDep,
    context: ContextDep,
    framing: FramingDep,
    deadline: DeadlineDep,
) -> BatchPredictionResponse:
    """Classify several X-rays sent as repeated multipart `file` fields; one result per image,
    in the order sent (research use only).

    Each result has its own `status`: 200 with `prediction` (the same object `POST /predict`
    returns), or the error status with `error` (`{"code", "message"}`), so one undecodable or
    refused image does not fail the others. The whole request is refused only for what concerns
    all of it: 408 when the body arrives too slowly, 413 when the body passes
    `CXR_MAX_UPLOAD_BYTES` in all, 415 when it is not multipart, 422 for no `file` field or more
    than `CXR_MAX_IMAGES_PER_REQUEST`, 429 when the service cannot take that many images now, 503
    when not ready.
    """
    timer = context.timer
    declared_upload_bytes(framing, settings.max_upload_bytes)  # 413 before the body is read
    with held_upload(request, step.admission) as ticket:
        limits = (settings.max_upload_bytes, settings.max_images_per_request)
        parts = await _timed_read(timer, read_upload_parts(request, framing, *limits))
        await ticket.take_image(SLOT_WAIT_S)
        ticket.grow(len(parts) - 1)
        outcomes = await asyncio.gather(
            *(step.predict(part, deadline, timer=timer) for part in parts),
            return_exceptions=True,
        )
    del parts
    answers = [_part_answer(outcome) for outcome in outcomes]
    context.fields.update(images=len(answers))
    total_ms = timer.finish()
    results = [
        schemas.batch_item(
            index,
            outcome,
            schemas.prediction_response(outcome, step.classifier, context.request_id, total_ms)
            if isinstance(outcome, Prediction)
            else None,
        )
        for index, outcome in enumerate(answers)
    ]
    return BatchPredictionResponse(
        results=results,
        model=schemas.model_identity(step.classifier),
        execution_provider=step.classifier.execution_provider,
        request_id=context.request_id,
    )


def _part_answer(outcome: Prediction | BaseException) -> Prediction | ServiceError:
    """One part's answer. Anything but a `ServiceError` is a bug, not a bad image: logged with its
    traceback and answered as that part's 500, so the other parts keep their answers and the
    connection stays open."""
    if isinstance(outcome, Prediction | ServiceError):
        return outcome
    if not isinstance(outcome, Exception):
        raise outcome  # cancellation and the like end the request
    logger.error("unhandled error in a batch part", exc_info=outcome)
    return ServiceError("internal server error")


async def _timed_read(timer: RequestTimer, reading: Awaitable[T]) -> T:
    """Await the body's reading and report it as the `upload_read` phase."""
    started = time.perf_counter()
    try:
        return await reading
    finally:
        timer.record("upload_read", time.perf_counter() - started)


@router.get("/health/live", response_model=LiveResponse, tags=["health"])
async def live() -> LiveResponse:
    """Liveness: 200 whenever the process can answer HTTP, ready or not.

    Restart the container only if this fails; route traffic by `/health/ready`.
    """
    return LiveResponse()


@router.get(
    "/health/ready", response_model=ReadyResponse, responses=error_responses(503), tags=["health"]
)
async def ready(state: ServiceStateDep) -> ReadyResponse:
    """Readiness: 200 only when a model is loaded, its metadata matched the ONNX session, and a
    warm-up inference passed. Otherwise 503 with the reason (missing or invalid metadata, sha256
    mismatch, signature mismatch, unavailable provider, shutting down). A C-STORE listener that
    could not start does not make it 503: the HTTP API serves; `dicom_listener_down` says why."""
    # The one readiness rule (`ServiceState.not_ready_reason`); the `cxr_ready` gauge reads it too.
    reason = state.not_ready_reason
    classifier = state.classifier
    if reason is not None or classifier is None:
        raise ModelNotReady(reason or "model is not loaded")
    return ReadyResponse(
        model=schemas.model_identity(classifier),
        execution_provider=classifier.execution_provider,
        dicom_listener_down=state.dicom_listener_down,
    )


# Some load balancers probe with HEAD: same handlers, kept out of the OpenAPI document.
router.add_api_route("/health/live", live, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/health/ready", ready, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/model",
    response_model=ModelInfo,
    responses=error_responses(503),
    tags=["model"],
    dependencies=REQUIRE_API_KEY,
)
async def model_info(
    classifier: ClassifierDep, state: ServiceStateDep, pipeline: OptionalPipelineDep
) -> ModelInfo:
    """The served model's metadata: classes in output order, input contract, preprocessing,
    operating threshold, calibration, metrics and provenance, plus the active execution provider,
    `site_calibration` when a site profile is loaded, `dicom_listener` (whom it admits) while the
    C-STORE listener runs, and `dicom_listener_down` when it could not start."""
    info = schemas.model_info(classifier)
    if state.dicom_listener_down is not None:
        info = info.model_copy(update={"dicom_listener_down": state.dicom_listener_down})
    listener = pipeline.listener if pipeline is not None else None
    if listener is not None and listener.running:
        peers = listener.peers
        described = schemas.DicomListenerInfo(
            ae_title=listener.ae_title,
            port=listener.port,
            admits="anyone" if peers is None else "listed_peers",
            peers=[str(peer) for peer in peers or ()],
            warning=schemas.OPEN_LISTENER_WARNING if peers is None else None,
            tls=listener.tls_mode,
        )
        info = info.model_copy(update={"dicom_listener": described})
    return info


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {METRICS_CONTENT_TYPE: {}}, "description": "Metrics"}},
    tags=["monitoring"],
    dependencies=REQUIRE_API_KEY,
)
async def metrics(service_metrics: MetricsDep) -> Response:
    """Prometheus metrics (text exposition format): requests by route, status and error code;
    per-phase latency histograms; batch sizes; queue depth; images in flight and the admission
    limit; decode memory reserved; model identity; readiness; and for drift, answers by label,
    P(positive), input statistics on fixed label sets and the drift score against the model's
    validation reference. Answers whether or not the model is ready, and is never refused for
    overload."""
    return Response(service_metrics.exposition(), media_type=METRICS_CONTENT_TYPE)
