"""Typed response bodies (their field descriptions become the OpenAPI schema), and the functions
that shape the serving stage's results into them, so that routes only route."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.contract import (
    DISCLAIMER,
    Calibration,
    Decision,
    InputSpec,
    IntendedUse,
    OutputSpec,
    Preprocessing,
)
from app.errors import ServiceError
from app.http.errors import ErrorDetail
from app.imaging.dicom import DicomFindings
from app.model.classifier import Classifier
from app.model.explain import DEFAULT_OPACITY
from app.model.site_profile import SiteProfile
from app.pacs.outbox import DeliveryState, ResultObject
from app.serving.prediction import Explained, Prediction


class ModelIdentity(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the ONNX file that produced the answer.")


class TimingsMs(BaseModel):
    decode: float = Field(description="Decoding and preprocessing, milliseconds.")
    inference: float = Field(description="ONNX Runtime run, including queueing for it.")
    total: float = Field(description="From the request's arrival to the response, milliseconds.")


class AppliedWindowInfo(BaseModel):
    source: Literal["window", "voi_lut_sequence", "full_range"] = Field(
        description="Which VOI step was applied: the file's window (Window Center/Width), its "
        "VOI LUT Sequence, or the full range of its pixel values."
    )
    center: float | None = Field(
        default=None, description="Window center in modality units (full range: its middle)."
    )
    width: float | None = Field(
        default=None, description="Window width in modality units (full range: its extent)."
    )
    function: str | None = Field(
        default=None, description="VOI LUT Function for a window: LINEAR, LINEAR_EXACT, SIGMOID."
    )


class DicomInfo(BaseModel):
    """What the service read from a DICOM upload's header, so that a PACS integration can attach
    the result to the right image. Nothing else from the header is ever repeated."""

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    modality: str = Field(description="CR or DX.")
    view_position: str | None = Field(description="View Position as sent (AP, PA, ...), if any.")
    transfer_syntax: str = Field(description="Transfer Syntax UID of the upload.")
    window: AppliedWindowInfo


class Explanation(BaseModel):
    """A class activation map: where the evidence for one class lies in the model's input."""

    method: Literal["CAM"] = Field(
        default="CAM",
        description="Class activation mapping, exact for this model's global-average-pooling "
        "head: the map's spatial mean plus the class bias is the class logit.",
    )
    target_class: str = Field(description="The class explained (the answer's label by default).")
    grid: list[list[float]] = Field(
        description="The map at the network's feature resolution, min-max scaled to [0, 1] "
        "over this image (relative evidence, not probability)."
    )
    class_logit: float = Field(
        description="The map's spatial mean plus the class bias: the model's logit for the class."
    )
    opacity: float = Field(description="Opacity of the map in `overlay_png`.")
    image_png: str = Field(description="Base64 PNG: the model input as an 8-bit grey image.")
    heatmap_png: str = Field(description="Base64 PNG: the map upsampled to the input and coloured.")
    overlay_png: str = Field(description="Base64 PNG: the heat map laid over the input image.")


class ResultObjectInfo(BaseModel):
    kind: str = Field(description="`sr` (TID 1500 Comprehensive 3D SR) or `sc` (heat map).")
    sop_class_uid: str
    sop_instance_uid: str = Field(
        description="Derived from the source image, the model and the kind: sending the same "
        "image again yields the same objects."
    )


class DeliveryInfo(BaseModel):
    destination: str = Field(description="`dicomweb` (STOW-RS) or `dimse` (C-STORE).")
    kind: str
    sop_instance_uid: str
    state: str = Field(description="`pending` (queued or being retried), `delivered`, `failed`.")
    attempts: int
    last_error: str | None = Field(description="Status or error class of the last failure.")


class ResultInfo(BaseModel):
    """The DICOM result objects of one answer, and their delivery."""

    source_sop_instance_uid: str
    objects: list[ResultObjectInfo]
    deliveries: list[DeliveryInfo] = Field(
        description="One per object and configured destination; empty when none is configured "
        "(the result is then only readable at `/results/...`)."
    )


class StoredResultResponse(BaseModel):
    """A stored result: the answer the objects were made from, and their delivery states."""

    answer: dict[str, Any] = Field(description="The JSON answer (as `POST /predict` gives it).")
    result: ResultInfo
    disclaimer: str = DISCLAIMER


def _absent_when_none(value: object) -> bool:
    return value is None


class SiteCalibrationInfo(BaseModel):
    """The site profile (`CXR_SITE_PROFILE`) that produced the label: its recalibration of the
    model's calibrated probability of the positive class, p' = sigmoid(slope * logit(p) +
    intercept), and its threshold on p'."""

    profile: str = Field(description="The profile's name, as `pneumonia-validate-site` wrote it.")
    sha256: str = Field(
        description="sha256 of the profile's canonical JSON (sorted keys, no spaces)."
    )
    method: Literal["platt", "temperature"] = Field(
        description="`platt`: slope and intercept fitted; `temperature`: the slope only."
    )
    slope: float
    intercept: float
    threshold: float = Field(
        description="Operating threshold on the site's probability of `positive_class`."
    )
    positive_class: str
    target_sensitivity: float = Field(description="The sensitivity the threshold was chosen for.")
    model_threshold: float = Field(
        description="The model's own threshold (`decision.threshold`), not applied."
    )


class AnswerCalibration(SiteCalibrationInfo):
    model_probabilities: dict[str, float] = Field(
        description="The model's own calibrated probabilities, before the site's recalibration."
    )


class PredictionResponse(BaseModel):
    label: str = Field(
        description="The class at the operating threshold (the site profile's, when one is loaded)."
    )
    probabilities: dict[str, float] = Field(
        description="Calibrated probability per class, in the model's class order; sums to 1. "
        "With a site profile, the site's: the positive class's recalibrated probability, the "
        "other classes sharing the rest in the model's proportions (two classes: 1 - p')."
    )
    threshold: float = Field(
        description="Operating threshold on the positive class's probability in `probabilities` "
        "(the site profile's, when one is loaded)."
    )
    model: ModelIdentity
    execution_provider: str = Field(description="The ONNX Runtime provider that ran the model.")
    request_id: str = Field(description="Also returned as the X-Request-ID header.")
    timing_ms: TimingsMs
    dicom: DicomInfo | None = Field(
        default=None, description="Present for DICOM uploads: identifiers and applied window."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="Caveats about this answer, e.g. a patient outside the training population.",
    )
    explanation: Explanation | None = Field(
        default=None, description="Present only when asked for with `explain=true`."
    )
    # Answers without `deliver=true` stay exactly what they were: no `result` key at all.
    result: ResultInfo | None = Field(
        default=None,
        exclude_if=_absent_when_none,
        description="Present only with `deliver=true`: the DICOM result objects made from this "
        "answer and where they are being delivered.",
    )
    calibration: AnswerCalibration | None = Field(
        default=None,
        exclude_if=_absent_when_none,
        description="Present only when a site profile is loaded: the profile, recalibration and "
        "threshold that produced `label` and `probabilities`, and the model's own probabilities.",
    )
    disclaimer: str = DISCLAIMER

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "label": "PNEUMONIA",
                    "probabilities": {"NORMAL": 0.08, "PNEUMONIA": 0.92},
                    "threshold": 0.43,
                    "model": {"name": "pneumonia_cxr", "version": "1.0.0", "sha256": "3f5a..."},
                    "execution_provider": "CPUExecutionProvider",
                    "request_id": "0b9f6c1e2d7a4f0c9a8b7c6d5e4f3a2b",
                    "timing_ms": {"decode": 41.2, "inference": 18.7, "total": 63.5},
                    "disclaimer": DISCLAIMER,
                }
            ]
        }
    }


class BatchItem(BaseModel):
    """The outcome for one image of a multi-image request."""

    index: int = Field(description="Position of the image among the request's `file` fields.")
    status: int = Field(description="The HTTP status this image alone would have got.")
    prediction: PredictionResponse | None = Field(
        default=None, description="Present when `status` is 200."
    )
    error: ErrorDetail | None = Field(default=None, description="Present otherwise.")


class BatchPredictionResponse(BaseModel):
    results: list[BatchItem] = Field(description="One per image, in the order sent.")
    model: ModelIdentity
    execution_provider: str
    request_id: str
    disclaimer: str = DISCLAIMER


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


_LISTENER_DOWN = (
    "Present only when the DICOM C-STORE listener (`CXR_DICOM_PORT`) could not start: why. "
    "The HTTP API (uploads, STOW-RS, results) serves without it."
)


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelIdentity
    execution_provider: str
    dicom_listener_down: str | None = Field(
        default=None, exclude_if=_absent_when_none, description=_LISTENER_DOWN
    )


class DeletedResultResponse(BaseModel):
    """What `DELETE /results/{SOPInstanceUID}` removed from the results store."""

    sop_instance_uid: str
    results_removed: int = Field(description="Results removed (one per image content read).")
    objects_removed: list[str] = Field(
        description="SOP Instance UIDs of the result objects removed (SR, SC, RIS messages)."
    )


class DicomListenerInfo(BaseModel):
    """The running C-STORE listener and whom it admits."""

    ae_title: str
    port: int
    admits: Literal["listed_peers", "anyone"] = Field(
        description="`listed_peers`: only the (AE title, address) pairs in `peers`; `anyone`: "
        "any caller from anywhere (`CXR_DICOM_OPEN=true`)."
    )
    peers: list[str] = Field(description="`AE@address` or `AE@network/prefix`; `*`: any title.")
    tls: Literal["none", "server", "mutual"] = Field(
        default="none",
        description="`none`: plain TCP; `server`: DICOM TLS; `mutual`: DICOM TLS, and a caller "
        "must present a certificate of `CXR_DICOM_TLS_CLIENT_CA`.",
    )
    warning: str | None = Field(default=None, exclude_if=_absent_when_none)


OPEN_LISTENER_WARNING = (
    "CXR_DICOM_OPEN=true: any host that reaches this port can store images and have results "
    "written into the PACS; list the callers in CXR_DICOM_PEERS"
)


class ModelInfo(BaseModel):
    """Everything a client needs to interpret an answer: the metadata contract, as served."""

    name: str
    version: str
    sha256: str
    classes: list[str] = Field(description="Class names in the model's output order.")
    input: InputSpec
    output: OutputSpec = Field(description="The classifier output (class scores).")
    outputs: list[OutputSpec] = Field(description="Every graph output the service uses, by role.")
    preprocessing: Preprocessing
    decision: Decision
    calibration: Calibration
    intended_use: IntendedUse
    explanations: bool = Field(
        description="Whether `POST /predict?explain=true` can return class activation maps."
    )
    metrics: dict[str, object]
    provenance: dict[str, object]
    execution_provider: str
    # `calibration` above is the model's own (its temperature); this one, when a site profile is
    # loaded, is applied after it and gives the label.
    site_calibration: SiteCalibrationInfo | None = Field(
        default=None,
        exclude_if=_absent_when_none,
        description="Present only when a site profile is loaded: the site's recalibration, applied "
        "after `calibration`, and the threshold that gives the label instead of `decision`'s.",
    )
    dicom_listener_down: str | None = Field(
        default=None, exclude_if=_absent_when_none, description=_LISTENER_DOWN
    )
    dicom_listener: DicomListenerInfo | None = Field(
        default=None,
        exclude_if=_absent_when_none,
        description="Present only while the C-STORE listener runs: its AE title, port, and whom "
        "it admits.",
    )
    disclaimer: str = DISCLAIMER


# -- shaping ----------------------------------------------------------------------------------


def model_identity(classifier: Classifier) -> ModelIdentity:
    meta = classifier.metadata
    return ModelIdentity(name=meta.name, version=meta.version, sha256=meta.sha256)


def prediction_response(
    prediction: Prediction, classifier: Classifier, request_id: str, total_ms: float
) -> PredictionResponse:
    return PredictionResponse(
        label=prediction.label,
        probabilities=prediction.probabilities,
        threshold=classifier.threshold,
        model=model_identity(classifier),
        execution_provider=classifier.execution_provider,
        request_id=request_id,
        timing_ms=TimingsMs(
            decode=prediction.decode_ms, inference=prediction.inference_ms, total=total_ms
        ),
        dicom=dicom_info(prediction.dicom) if prediction.dicom else None,
        warnings=prediction.warnings,
        explanation=explanation(prediction.explanation, classifier)
        if prediction.explanation
        else None,
        calibration=answer_calibration(classifier, prediction),
    )


def site_calibration(classifier: Classifier) -> SiteCalibrationInfo | None:
    profile: SiteProfile | None = classifier.site_profile
    if profile is None:
        return None
    return SiteCalibrationInfo(
        profile=profile.name,
        sha256=profile.sha256,
        method=profile.recalibration.method,
        slope=profile.recalibration.slope,
        intercept=profile.recalibration.intercept,
        threshold=profile.operating.threshold,
        positive_class=profile.operating.positive_class,
        target_sensitivity=profile.operating.target_sensitivity,
        model_threshold=classifier.metadata.decision.threshold,
    )


def answer_calibration(classifier: Classifier, prediction: Prediction) -> AnswerCalibration | None:
    info = site_calibration(classifier)
    if info is None or prediction.model_probabilities is None:
        return None
    return AnswerCalibration(
        **info.model_dump(), model_probabilities=prediction.model_probabilities
    )


def explanation(explained: Explained, classifier: Classifier) -> Explanation:
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


def dicom_info(findings: DicomFindings) -> DicomInfo:
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


def batch_item(
    index: int, outcome: Prediction | ServiceError, response: PredictionResponse | None
) -> BatchItem:
    """One image's entry in a batch answer: its prediction, or the error it alone would get."""
    if isinstance(outcome, ServiceError):
        error = ErrorDetail(code=outcome.code, message=outcome.message)
        return BatchItem(index=index, status=outcome.status_code, error=error)
    return BatchItem(index=index, status=200, prediction=response)


def model_info(classifier: Classifier) -> ModelInfo:
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
        site_calibration=site_calibration(classifier),
    )


def result_info(
    source_sop_instance_uid: str,
    objects: Sequence[ResultObject],
    deliveries: Sequence[DeliveryState],
) -> ResultInfo:
    return ResultInfo(
        source_sop_instance_uid=source_sop_instance_uid,
        objects=[
            ResultObjectInfo(
                kind=o.kind, sop_class_uid=o.sop_class_uid, sop_instance_uid=o.sop_instance_uid
            )
            for o in objects
        ],
        deliveries=[
            DeliveryInfo(
                destination=d.destination,
                kind=d.kind,
                sop_instance_uid=d.sop_instance_uid,
                state=d.state,
                attempts=d.attempts,
                last_error=d.last_error,
            )
            for d in deliveries
        ],
    )
