"""The seam between the routes and the model: an awaitable `InferenceEngine`.

Routes only ever `await engine.infer(batch)`. Today `ThreadPoolEngine` runs each request's batch
of one in a worker thread; a micro-batching scheduler (queue requests, run them as one (N, ...)
batch, resolve each caller's future) implements the same protocol and drops in without touching
the routes, because `Classifier.predict_batch` already takes and returns batches.
"""

from __future__ import annotations

from typing import Protocol

import anyio
import anyio.to_thread
import numpy as np

from app.inference import Classifier


class InferenceEngine(Protocol):
    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, classes) for an (N, H, W, C) float32 batch."""
        ...


class ThreadPoolEngine:
    """Runs the ONNX Runtime call in a worker thread, never on the event loop.

    A dedicated limiter bounds how many runs are in flight, separately from the decode threads:
    one CPU run already fans out over every intra-op thread, so more only adds contention.
    """

    def __init__(self, classifier: Classifier, concurrency: int) -> None:
        self._classifier = classifier
        self._limiter = anyio.CapacityLimiter(concurrency)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        return await anyio.to_thread.run_sync(
            self._classifier.predict_batch, batch, limiter=self._limiter
        )
