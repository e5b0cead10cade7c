"""One prediction step: upload bytes -> decode -> preprocess -> model -> a labelled answer.

The routes call `PredictionStep.predict` once per image and only shape HTTP around it; everything
that happens to an image (the decode threads and their memory budget, the batching engine,
deadlines, per-phase timing) happens here. Admission (how many images may be in flight) is here
too, so that every intake refuses overload the same way. What the step observes goes out through
the `StepObserver` protocol (the metrics implement it), never by importing the metrics: phases,
model runs, and for drift monitoring each answer's probability, label and input statistics
(`ServedAnswer`, which carries no identifier and no header value but the equipment's maker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from app.contract import ProbabilityReference
from app.errors import DeadlineExceeded, ExplanationUnavailable, InvalidRequest
from app.imaging.dicom import DicomFindings
from app.imaging.formats import OpenedUpload
from app.model.classifier import Classifier, PreparedImage
from app.model.explain import ClassActivationMap, ExplanationImages, render_images
from app.serving.admission import AdaptiveLimit, Admission, AdmissionTicket, DecodeBudget
from app.serving.batching import BatchingEngine, BatchObserver, InferenceEngine
from app.serving.timing import PhaseObserver, RequestTimer
from app.settings import Settings

R = TypeVar("R")


@dataclass(frozen=True)
class ServedAnswer:
    """What drift monitoring sees of one answer: no identifier, no patient value, no pixels."""

    label: str
    p_positive: float  # as answered (the site's, where a site profile is loaded)
    model_p_positive: float  # the model's own calibrated one, comparable with its reference
    input_mean: float  # of the model input, in 8-bit grey levels (0-255)
    input_std: float
    stored_size: tuple[int, int] | None  # width, height of the upload as stored
    format: str  # JPEG, PNG, DICOM
    modality: str | None = None  # DICOM Modality (gated to the intended use)
    manufacturer: str | None = None  # DICOM Manufacturer as recorded; the metrics bound it


class AnswerObserver(Protocol):
    """Where answers go for drift monitoring (the metrics implement it)."""

    def drift_reference(
        self, reference: ProbabilityReference | None, window: int, classes: list[str]
    ) -> None:
        """A model started serving with this reference distribution (None: it has none)."""
        ...

    def answered(self, answer: ServedAnswer) -> None: ...


class StepObserver(PhaseObserver, BatchObserver, AnswerObserver, Protocol):
    """Everything the prediction step reports: phases, model runs, the model it serves, answers."""

    def model_loaded(self, name: str, version: str, sha256: str, provider: str) -> None: ...


@dataclass(frozen=True)
class Prediction:
    """The answer for one image, before HTTP shaping."""

    probabilities: dict[str, float]  # as answered, in the model's class order
    label: str
    decode_ms: float
    inference_ms: float  # waiting for a model run plus the run itself
    dicom: DicomFindings | None = None
    warnings: list[str] = field(default_factory=list)
    explanation: Explained | None = None
    # With a site profile: the model's own calibrated probabilities, before the site's
    # recalibration (`probabilities` are then the site's). None without a profile.
    model_probabilities: dict[str, float] | None = None


@dataclass(frozen=True)
class Explained:
    """A class activation map and its pictures, computed with the scores they explain."""

    cam: ClassActivationMap
    images: ExplanationImages


class PredictionStep:
    """Decode, preprocess and classify uploads, refusing what the service cannot take on."""

    def __init__(
        self,
        classifier: Classifier,
        engine: InferenceEngine,
        settings: Settings,
        metrics: StepObserver,
    ) -> None:
        self.classifier = classifier
        self.engine = engine
        self.metrics = metrics
        adaptive = None
        if settings.adaptive_limit_target_ms:
            adaptive = AdaptiveLimit(
                ceiling=settings.max_in_flight_images,
                # Enough to keep every decode thread and a model batch busy.
                floor=2 * settings.decode_slots + settings.max_batch_size,
                target_s=settings.adaptive_limit_target_ms / 1000.0,
            )
        self.admission = Admission(
            max_images=settings.max_in_flight_images,
            max_upload_bytes=settings.max_in_flight_upload_bytes,
            retry_after_s=settings.retry_after_s,
            max_client_share=settings.max_client_share,
            adaptive=adaptive,
            stall_s=settings.ready_stall_s,
        )
        self.decode_budget = DecodeBudget(settings.decode_memory_budget_bytes)
        # Decode threads: one more than the cores keeps them busy without piling up decoded
        # images. A pool of its own, fed by its queue: a thread that finishes one image takes the
        # next at once, with no round trip through the event loop to hand out a slot.
        self._decoders = ThreadPoolExecutor(settings.decode_slots, thread_name_prefix="cxr-decode")

    @contextmanager
    def admit(self, images: int, upload_bytes: int) -> Iterator[AdmissionTicket]:
        """Hold room for `images` uploads of `upload_bytes` in total, or raise `Overloaded`."""
        with self.admission.admit(images, upload_bytes) as ticket:
            yield ticket

    def check_explanation_request(self, explain: bool, explain_class: str | None) -> None:
        """Refuse, before any work, an explanation this model cannot give or a class it lacks."""
        meta = self.classifier.metadata
        if explain and not self.classifier.explains:
            raise ExplanationUnavailable(
                f"model {meta.name} {meta.version} has no class-activation-map output"
            )
        if explain_class is not None and explain_class not in meta.classes:
            raise InvalidRequest(f"explain_class must be one of {', '.join(meta.classes)}")

    async def predict(
        self,
        data: bytes,
        deadline: float | None = None,
        explain: bool = False,
        explain_class: str | None = None,
        timer: RequestTimer | None = None,
    ) -> Prediction:
        """One upload's answer. `deadline` (a `time.perf_counter()` value) bounds how long it may
        wait for a decode thread or a model run; past it, `DeadlineExceeded`. With `explain`, the
        model runs once outside the batching engine to return its feature map as well, and the
        answer carries the class activation map of `explain_class` (default: the label). The
        request's `timer` (a fresh one when not given) records the decode and inference phases.
        """
        timer = timer or RequestTimer(self.metrics)
        decode_started = time.perf_counter()
        try:
            prepared = await self._in_decode_thread(self._prepare, data, deadline)
        finally:  # undecodable uploads cost decode time too
            inference_started = time.perf_counter()
            decode_ms = timer.record("decode", inference_started - decode_started)
        del data  # the encoded bytes are no longer needed while the image waits for the model
        explained = None
        if explain:
            probabilities, explained = await self._in_decode_thread(
                self._explain, prepared.tensor, explain_class
            )
        else:
            probabilities = (await self.engine.infer(prepared.tensor, deadline))[0]
        finished = time.perf_counter()

        classifier = self.classifier
        meta = classifier.metadata
        answered = classifier.answer_probabilities(probabilities)
        prediction = Prediction(
            probabilities=_by_class(meta.classes, answered),
            label=classifier.label_for(probabilities),
            decode_ms=decode_ms,
            # Waiting for a model run plus the run. The histograms have the two apart (the engine
            # reports them per model run), so this figure goes to the answer and the log only.
            inference_ms=timer.record("inference", finished - inference_started, observe=False),
            dicom=prepared.dicom,
            warnings=prepared.warnings,
            explanation=explained,
            model_probabilities=None
            if classifier.site_profile is None
            else _by_class(meta.classes, probabilities),
        )
        self.metrics.answered(self._served_answer(prepared, prediction, probabilities))
        return prediction

    def _served_answer(
        self, prepared: PreparedImage, prediction: Prediction, model_probabilities: np.ndarray
    ) -> ServedAnswer:
        meta = self.classifier.metadata
        if prepared.grey_mean_std is None:
            prepared = prepared.with_grey_stats(meta.preprocessing.scale, meta.preprocessing.offset)
        assert prepared.grey_mean_std is not None
        grey_mean, grey_std = prepared.grey_mean_std
        dicom = prepared.dicom
        return ServedAnswer(
            label=prediction.label,
            p_positive=prediction.probabilities[meta.decision.positive_class],
            model_p_positive=float(model_probabilities[meta.positive_index]),
            input_mean=grey_mean,
            input_std=grey_std,
            stored_size=prepared.stored_size,
            format=prepared.format,
            modality=dicom.modality if dicom else None,
            manufacturer=dicom.manufacturer if dicom else None,
        )

    def _explain(self, tensor: np.ndarray, class_name: str | None) -> tuple[np.ndarray, Explained]:
        probabilities, cam = self.classifier.predict_with_cam(tensor, class_name)
        spec = self.classifier.metadata.preprocessing
        return probabilities, Explained(cam, render_images(tensor, cam, spec.scale, spec.offset))

    def _prepare(self, data: bytes, deadline: float | None) -> PreparedImage:
        # In a decode thread: the wait for this thread is the likeliest place to outlive a deadline.
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("the request's deadline passed before its image was decoded")
        opened: OpenedUpload = self.classifier.open(data)  # the header, parsed once
        with self.decode_budget.hold(opened.decode_bytes):
            prepared = self.classifier.prepare(opened)
        spec = self.classifier.metadata.preprocessing
        return prepared.with_grey_stats(spec.scale, spec.offset)

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth

    async def aclose(self) -> None:
        """Stop taking images; those already queued for the model still get their answers."""
        await self.engine.aclose()
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def _in_decode_thread(self, work: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._decoders, work, *args)


def _by_class(classes: list[str], probabilities: np.ndarray) -> dict[str, float]:
    return {name: float(p) for name, p in zip(classes, probabilities, strict=True)}


def start_prediction(
    classifier: Classifier, settings: Settings, metrics: StepObserver
) -> PredictionStep:
    """The serving prediction step: a started batching engine over the classifier, with the
    settings' admission limits. Call on the event loop that will serve the requests."""
    engine = BatchingEngine(
        classifier.predict_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        observer=metrics,
    )
    engine.start()
    meta = classifier.metadata
    metrics.model_loaded(meta.name, meta.version, meta.sha256, classifier.execution_provider)
    reference = meta.monitoring.reference if meta.monitoring else None
    metrics.drift_reference(reference, settings.drift_window, list(meta.classes))
    return PredictionStep(classifier, engine, settings, metrics)
