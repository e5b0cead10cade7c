"""HTTP routes. They parse, delegate and shape responses; the work happens elsewhere:
`uploads` reads the body, `PredictionStep` admits, decodes and classifies each image (decode in a
worker thread, the model in the batching engine), `errors` maps failures to HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response

from app.auth import REQUIRE_API_KEY
from app.dicom import DicomFindings
from app.errors import (
    ErrorDetail,
    ExplanationUnavailable,
    InvalidRequest,
    ModelNotReady,
    ServiceError,
    error_responses,
)
from app.explain import DEFAULT_OPACITY
from app.inference import Classifier
from app.metrics import METRICS_CONTENT_TYPE, ServiceMetrics
from app.observability import RequestContext, request_context
from app.prediction import Explained, Prediction, PredictionStep
from app.readiness import SHUTTING_DOWN, ServiceState
from app.schemas import (
    AppliedWindowInfo,
    BatchItem,
    BatchPredictionResponse,
    DicomInfo,
    Explanation,
    LiveResponse,
    ModelIdentity,
    ModelInfo,
    PredictionResponse,
    ReadyResponse,
    TimingsMs,
)
from app.settings import Settings
from app.uploads import (
    FILE_FIELD,
    RAW_CONTENT_TYPES,
    declared_upload_bytes,
    read_upload,
    read_upload_parts,
)

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
T = TypeVar("T")

router = APIRouter()


# Dependencies are `async def` on purpose: they only read app.state, and FastAPI would otherwise
# send each of them to the thread pool.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


ServiceStateDep = Annotated[ServiceState, Depends(get_service_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_classifier(state: ServiceStateDep) -> Classifier:
    """The serving classifier, or 503 with the reason it cannot serve. While draining after a
    termination signal it still serves: readiness is what tells load balancers to go away."""
    reason = state.unavailable_reason
    if reason is not None or state.classifier is None:
        raise ModelNotReady(reason or "model is not loaded")
    return state.classifier


async def get_prediction_step(
    state: ServiceStateDep, _: Annotated[Classifier, Depends(get_classifier)]
) -> PredictionStep:
    """The prediction step; depends on `get_classifier` so it is only handed out when ready."""
    step = state.step
    if step is None:
        raise ModelNotReady(state.unavailable_reason or "model is not loaded")
    return step


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
StepDep = Annotated[PredictionStep, Depends(get_prediction_step)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


def _identity(classifier: Classifier) -> ModelIdentity:
    meta = classifier.metadata
    return ModelIdentity(name=meta.name, version=meta.version, sha256=meta.sha256)


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


_PREDICT_ERRORS = error_responses(413, 415, 422, 429, 503)


@router.post(
    "/predict",
    response_model=PredictionResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Screen one chest X-ray for pneumonia",
    tags=["inference"],
    dependencies=REQUIRE_API_KEY,
)
async def predict(
    request: Request,
    step: StepDep,
    settings: SettingsDep,
    explain: Annotated[
        bool,
        Query(
            description="Also return a class activation map (`explanation`): where the model "
            "found the evidence. Costs a few milliseconds and about 100 KB of response."
        ),
    ] = False,
    explain_class: Annotated[
        str | None,
        Query(description="The class to explain; by default the answer's label."),
    ] = None,
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
    wait for the model. Errors: 413 upload too large, 415 unsupported format, 422 undecodable / too
    small / too many pixels / `not_intended_use` (another modality, body part or view, multi-frame,
    colour, no pixel data) / `explanation_unavailable`, 429 `overloaded` (the service is full:
    retry after `Retry-After` seconds), 503 model not ready, or `deadline_exceeded` (with
    `Retry-After`).

    With `explain=true` the answer also carries `explanation`: the class activation map of the
    label (or of `explain_class`), exact for this model, as a grid and as PNG pictures (the input,
    the coloured map, and the two overlaid). Default answers do not compute it.
    """
    meta = step.classifier.metadata
    if explain and not step.classifier.explains:
        raise ExplanationUnavailable(
            f"model {meta.name} {meta.version} has no class-activation-map output"
        )
    if explain_class is not None and explain_class not in meta.classes:
        raise InvalidRequest(f"explain_class must be one of {', '.join(meta.classes)}")
    context = request_context(request)
    deadline = _deadline(request, context, settings)
    with step.admit(1, declared_upload_bytes(request, settings.max_upload_bytes)):
        data = await _timed_read(step, read_upload(request, settings.max_upload_bytes))
        prediction = await step.predict(data, deadline, explain, explain_class)
    response = _prediction_response(prediction, step.classifier, context)
    context.fields.update(decode_ms=prediction.decode_ms, inference_ms=prediction.inference_ms)
    step.metrics.phase("total", context.elapsed_ms() / 1000.0)
    return response


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
    dependencies=REQUIRE_API_KEY,
)
async def predict_batch(
    request: Request, step: StepDep, settings: SettingsDep
) -> BatchPredictionResponse:
    """Classify several X-rays sent as repeated multipart `file` fields; one result per image,
    in the order sent (research use only).

    Each result has its own `status`: 200 with `prediction` (the same object `POST /predict`
    returns), or the error status with `error` (`{"code", "message"}`), so one undecodable or
    refused image does not fail the others. The whole request is refused only for what concerns
    all of it: 413 when the body passes `CXR_MAX_UPLOAD_BYTES` in all, 415 when it is not
    multipart, 422 for no `file` field or more than `CXR_MAX_IMAGES_PER_REQUEST`, 429 when the
    service cannot take that many images now, 503 when not ready.
    """
    context = request_context(request)
    deadline = _deadline(request, context, settings)
    with step.admit(1, declared_upload_bytes(request, settings.max_upload_bytes)) as ticket:
        limits = (settings.max_upload_bytes, settings.max_images_per_request)
        parts = await _timed_read(step, read_upload_parts(request, *limits))
        ticket.grow(len(parts) - 1)
        outcomes = await asyncio.gather(
            *(step.predict(part, deadline) for part in parts), return_exceptions=True
        )
    del parts
    results = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Prediction):
            prediction = _prediction_response(outcome, step.classifier, context)
            results.append(BatchItem(index=index, status=200, prediction=prediction))
        elif isinstance(outcome, ServiceError):
            error = ErrorDetail(code=outcome.code, message=outcome.message)
            results.append(BatchItem(index=index, status=outcome.status_code, error=error))
        else:  # a bug, not a bad image: the handler logs it and answers 500
            raise outcome
    context.fields.update(images=len(results))
    step.metrics.phase("total", context.elapsed_ms() / 1000.0)
    return BatchPredictionResponse(
        results=results,
        model=_identity(step.classifier),
        execution_provider=step.classifier.execution_provider,
        request_id=context.request_id,
    )


async def _timed_read(step: PredictionStep, reading: Awaitable[T]) -> T:
    """Await the body's reading and report it as the `upload_read` phase."""
    started = time.perf_counter()
    try:
        return await reading
    finally:
        step.metrics.phase("upload_read", time.perf_counter() - started)


def _deadline(request: Request, context: RequestContext, settings: Settings) -> float | None:
    """The `time.perf_counter()` by which the request's images must reach the model, if any: the
    shorter of `CXR_REQUEST_TIMEOUT_MS` and the client's `X-Request-Timeout-Ms`."""
    budgets_ms = [settings.request_timeout_ms] if settings.request_timeout_ms else []
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        if not header.isdigit() or int(header) == 0:
            raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
        budgets_ms.append(int(header))
    return context.started + min(budgets_ms) / 1000.0 if budgets_ms else None


def _prediction_response(
    prediction: Prediction, classifier: Classifier, context: RequestContext
) -> PredictionResponse:
    return PredictionResponse(
        label=prediction.label,
        probabilities=prediction.probabilities,
        threshold=classifier.metadata.decision.threshold,
        model=_identity(classifier),
        execution_provider=classifier.execution_provider,
        request_id=context.request_id,
        timing_ms=TimingsMs(
            decode=prediction.decode_ms,
            inference=prediction.inference_ms,
            total=round(context.elapsed_ms(), 2),
        ),
        dicom=_dicom_info(prediction.dicom) if prediction.dicom else None,
        warnings=prediction.warnings,
        explanation=_explanation(prediction.explanation, classifier)
        if prediction.explanation
        else None,
    )


def _explanation(explained: Explained, classifier: Classifier) -> Explanation:
    cam, images = explained.cam, explained.images
    return Explanation(
        target_class=classifier.metadata.classes[cam.class_index],
        grid=[[round(float(v), 6) for v in row] for row in cam.normalised],
        class_logit=cam.logit,
        opacity=DEFAULT_OPACITY,
        image_png=images.image_png,
        heatmap_png=images.heatmap_png,
        overlay_png=images.overlay_png,
    )


def _dicom_info(findings: DicomFindings) -> DicomInfo:
    window = findings.window
    return DicomInfo(
        study_instance_uid=findings.study_instance_uid,
        series_instance_uid=findings.series_instance_uid,
        sop_instance_uid=findings.sop_instance_uid,
        modality=findings.modality,
        view_position=findings.view_position,
        transfer_syntax=findings.transfer_syntax,
        window=AppliedWindowInfo(
            source=window.source,  # type: ignore[arg-type]
            center=window.center,
            width=window.width,
            function=window.function,
        ),
    )


@router.get("/health/live", response_model=LiveResponse, tags=["health"])
async def live() -> LiveResponse:
    """Liveness: 200 whenever the process can answer HTTP, ready or not.

    Restart the container only if this fails; route traffic by `/health/ready`.
    """
    return LiveResponse()


@router.get(
    "/health/ready", response_model=ReadyResponse, responses=error_responses(503), tags=["health"]
)
async def ready(classifier: ClassifierDep, state: ServiceStateDep) -> ReadyResponse:
    """Readiness: 200 only when a model is loaded, its metadata matched the ONNX session, and a
    warm-up inference passed. Otherwise 503 with the reason (missing or invalid metadata, sha256
    mismatch, signature mismatch, unavailable provider, shutting down)."""
    if state.draining:
        raise ModelNotReady(SHUTTING_DOWN)
    return ReadyResponse(
        model=_identity(classifier), execution_provider=classifier.execution_provider
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
async def model_info(classifier: ClassifierDep) -> ModelInfo:
    """The served model's metadata: classes in output order, input contract, preprocessing,
    operating threshold, calibration, metrics and provenance, plus the active execution provider."""
    meta = classifier.metadata
    return ModelInfo(
        name=meta.name,
        version=meta.version,
        sha256=meta.sha256,
        classes=list(meta.classes),
        input=meta.input,
        output=meta.output,
        outputs=list(meta.outputs),
        preprocessing=meta.preprocessing,
        decision=meta.decision,
        calibration=meta.calibration,
        intended_use=meta.intended_use,
        explanations=classifier.explains,
        metrics=dict(meta.metrics),
        provenance=dict(meta.provenance),
        execution_provider=classifier.execution_provider,
    )


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
    limit; decode memory reserved; model identity; readiness. Answers whether or not the model
    is ready, and is never refused for overload."""
    return Response(service_metrics.exposition(), media_type=METRICS_CONTENT_TYPE)
