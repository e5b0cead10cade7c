"""HTTP routes. They parse, delegate and shape responses; the work happens elsewhere:
`uploads` reads the body, `Classifier.prepare` decodes (in a worker thread), the
`InferenceEngine` runs the model (off the event loop), `errors` maps failures to HTTP."""

from __future__ import annotations

import time
from typing import Annotated

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Query, Request

from app.auth import REQUIRE_API_KEY
from app.dicom import DicomFindings
from app.engine import InferenceEngine
from app.errors import ExplanationUnavailable, InvalidRequest, ModelNotReady, error_responses
from app.explain import DEFAULT_OPACITY, render_images
from app.inference import Classifier
from app.observability import request_context
from app.readiness import SHUTTING_DOWN, ServiceState
from app.schemas import (
    AppliedWindowInfo,
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
from app.uploads import FILE_FIELD, RAW_CONTENT_TYPES, read_upload

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


async def get_engine(
    state: ServiceStateDep, _: Annotated[Classifier, Depends(get_classifier)]
) -> InferenceEngine:
    """The inference engine; depends on `get_classifier` so it is only handed out when ready."""
    engine: InferenceEngine | None = state.engine
    if engine is None:
        raise ModelNotReady(state.unavailable_reason or "model is not loaded")
    return engine


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]


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


@router.post(
    "/predict",
    response_model=PredictionResponse,
    responses=error_responses(413, 415, 422, 503),
    openapi_extra=_PREDICT_BODY,
    summary="Screen one chest X-ray for pneumonia",
    tags=["inference"],
    dependencies=REQUIRE_API_KEY,
)
async def predict(
    request: Request,
    classifier: ClassifierDep,
    engine: EngineDep,
    settings: SettingsDep,
    state: ServiceStateDep,
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
    the positive class. Errors: 413 upload too large, 415 unsupported format, 422 undecodable / too
    small / too many pixels / `not_intended_use` (another modality, body part or view, multi-frame,
    colour, no pixel data) / `explanation_unavailable`, 503 model not ready.

    With `explain=true` the answer also carries `explanation`: the class activation map of the
    label (or of `explain_class`), exact for this model, as a grid and as PNG pictures (the input,
    the coloured map, and the two overlaid). Default answers do not compute it.
    """
    meta = classifier.metadata
    if explain and not classifier.explains:
        raise ExplanationUnavailable(
            f"model {meta.name} {meta.version} has no class-activation-map output"
        )
    if explain_class is not None and explain_class not in meta.classes:
        raise InvalidRequest(f"explain_class must be one of {', '.join(meta.classes)}")
    context = request_context(request)
    data = await read_upload(request, settings.max_upload_bytes)

    decode_started = time.perf_counter()
    prepared = await anyio.to_thread.run_sync(
        classifier.prepare, data, limiter=state.decode_limiter
    )
    del data  # the encoded bytes are no longer needed while inference runs
    inference_started = time.perf_counter()
    explanation = None
    if explain:
        probabilities, explanation = await anyio.to_thread.run_sync(
            _explained, classifier, prepared.tensor, explain_class, limiter=state.decode_limiter
        )
    else:
        probabilities = (await engine.infer(prepared.tensor))[0]
    finished = time.perf_counter()

    timings = TimingsMs(
        decode=round((inference_started - decode_started) * 1000.0, 2),
        inference=round((finished - inference_started) * 1000.0, 2),
        total=round(context.elapsed_ms(), 2),
    )
    context.fields.update(decode_ms=timings.decode, inference_ms=timings.inference)
    return PredictionResponse(
        label=classifier.label_for(probabilities),
        probabilities={name: float(p) for name, p in zip(meta.classes, probabilities, strict=True)},
        threshold=meta.decision.threshold,
        model=_identity(classifier),
        execution_provider=classifier.execution_provider,
        request_id=context.request_id,
        timing_ms=timings,
        dicom=_dicom_info(prepared.dicom) if prepared.dicom else None,
        warnings=prepared.warnings,
        explanation=explanation,
    )


def _explained(
    classifier: Classifier, tensor: np.ndarray, class_name: str | None
) -> tuple[np.ndarray, Explanation]:
    """One run for the scores and the feature map, then the pictures (in a worker thread)."""
    probabilities, cam = classifier.predict_with_cam(tensor, class_name)
    spec = classifier.metadata.preprocessing
    images = render_images(tensor, cam, spec.scale, spec.offset)
    explanation = Explanation(
        target_class=classifier.metadata.classes[cam.class_index],
        grid=[[round(float(v), 6) for v in row] for row in cam.normalised],
        class_logit=cam.logit,
        opacity=DEFAULT_OPACITY,
        image_png=images.image_png,
        heatmap_png=images.heatmap_png,
        overlay_png=images.overlay_png,
    )
    return probabilities, explanation


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
