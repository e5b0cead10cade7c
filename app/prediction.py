"""One prediction step: upload bytes -> decode -> preprocess -> model -> a labelled answer.

The routes call `PredictionStep.predict` once per image and only shape HTTP around it; everything
that happens to an image (the decode threads and their memory budget, the batching engine,
deadlines, per-phase metrics) happens here. Admission (how many images may be in flight) is here
too, so that both routes refuse overload the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from app.admission import Admission, AdmissionTicket, DecodeBudget
from app.dicom import DicomFindings
from app.engine import BatchingEngine, InferenceEngine
from app.errors import DeadlineExceeded
from app.explain import ClassActivationMap, ExplanationImages, render_images
from app.inference import Classifier, PreparedImage
from app.metrics import ServiceMetrics
from app.settings import Settings

R = TypeVar("R")


@dataclass(frozen=True)
class Prediction:
    """The answer for one image, before HTTP shaping."""

    probabilities: dict[str, float]  # calibrated, in the model's class order
    label: str
    decode_ms: float
    inference_ms: float  # waiting for a model run plus the run itself
    dicom: DicomFindings | None = None
    warnings: list[str] = field(default_factory=list)
    explanation: Explained | None = None


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
        metrics: ServiceMetrics,
    ) -> None:
        self.classifier = classifier
        self.engine = engine
        self.metrics = metrics
        self.admission = Admission(
            max_images=settings.max_in_flight_images,
            max_upload_bytes=settings.max_in_flight_upload_bytes,
            retry_after_s=settings.retry_after_s,
        )
        self.decode_budget = DecodeBudget(settings.decode_memory_budget_bytes)
        # Decode threads: one per core keeps the cores busy without piling up decoded images. A
        # pool of its own, fed by its queue: a thread that finishes one image takes the next at
        # once, with no round trip through the event loop to hand out a slot.
        self._decoders = ThreadPoolExecutor(settings.decode_slots, thread_name_prefix="cxr-decode")

    @contextmanager
    def admit(self, images: int, upload_bytes: int) -> Iterator[AdmissionTicket]:
        """Hold room for `images` uploads of `upload_bytes` in total, or raise `Overloaded`."""
        with self.admission.admit(images, upload_bytes) as ticket:
            yield ticket

    async def predict(
        self,
        data: bytes,
        deadline: float | None = None,
        explain: bool = False,
        explain_class: str | None = None,
    ) -> Prediction:
        """One upload's answer. `deadline` (a `time.perf_counter()` value) bounds how long it may
        wait for a decode thread or a model run; past it, `DeadlineExceeded`. With `explain`, the
        model runs once outside the batching engine to return its feature map as well, and the
        answer carries the class activation map of `explain_class` (default: the label)."""
        decode_started = time.perf_counter()
        try:
            prepared = await self._in_decode_thread(self._prepare, data, deadline)
        finally:  # undecodable uploads cost decode time too
            inference_started = time.perf_counter()
            self.metrics.phase("decode", inference_started - decode_started)
        del data  # the encoded bytes are no longer needed while the image waits for the model
        explained = None
        if explain:
            probabilities, explained = await self._in_decode_thread(
                self._explain, prepared.tensor, explain_class
            )
        else:
            probabilities = (await self.engine.infer(prepared.tensor, deadline))[0]
        finished = time.perf_counter()

        meta = self.classifier.metadata
        return Prediction(
            probabilities={
                name: float(p) for name, p in zip(meta.classes, probabilities, strict=True)
            },
            label=self.classifier.label_for(probabilities),
            decode_ms=round((inference_started - decode_started) * 1000.0, 2),
            inference_ms=round((finished - inference_started) * 1000.0, 2),
            dicom=prepared.dicom,
            warnings=prepared.warnings,
            explanation=explained,
        )

    def _explain(self, tensor: np.ndarray, class_name: str | None) -> tuple[np.ndarray, Explained]:
        probabilities, cam = self.classifier.predict_with_cam(tensor, class_name)
        spec = self.classifier.metadata.preprocessing
        return probabilities, Explained(cam, render_images(tensor, cam, spec.scale, spec.offset))

    def _prepare(self, data: bytes, deadline: float | None) -> PreparedImage:
        # In a decode thread: the wait for this thread is the likeliest place to outlive a deadline.
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("the request's deadline passed before its image was decoded")
        with self.decode_budget.hold(self.classifier.decode_cost(data)):
            return self.classifier.prepare(data)

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth

    async def aclose(self) -> None:
        """Stop taking images; those already queued for the model still get their answers."""
        await self.engine.aclose()
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def _in_decode_thread(self, work: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._decoders, work, *args)


def start_prediction(
    classifier: Classifier, settings: Settings, metrics: ServiceMetrics
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
    return PredictionStep(classifier, engine, settings, metrics)
