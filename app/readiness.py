"""What the service can do right now: serving a validated model, or not ready and why."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import anyio

from app.engine import InferenceEngine
from app.inference import Classifier

SHUTTING_DOWN = "shutting down"


@dataclass
class ServiceState:
    """Lives on `app.state.service`; it moves through loading -> ready -> draining -> stopped.

    Draining (a termination signal arrived) turns readiness to 503 so load balancers stop routing
    here, but requests that still arrive are served; stopped (the lifespan has exited) serves
    nothing. Every transition is a plain attribute assignment, so readers (routes, probes) never
    see a half-updated state.
    """

    classifier: Classifier | None = None
    engine: InferenceEngine | None = None
    failure: str = "model is loading"
    draining: bool = False
    stopped: bool = False
    # Bounds concurrent decodes: each can hold a full-resolution image (up to the pixel limit) in
    # memory, so a burst of uploads must queue rather than multiply memory by the thread count.
    decode_limiter: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(os.cpu_count() or 1)
    )

    @classmethod
    def for_settings(cls, decode_concurrency: int) -> ServiceState:
        """A fresh state; `decode_concurrency` 0 keeps one decode slot per reported CPU."""
        if decode_concurrency:
            return cls(decode_limiter=anyio.CapacityLimiter(decode_concurrency))
        return cls()

    def serve(self, classifier: Classifier, engine: InferenceEngine) -> None:
        self.classifier, self.engine = classifier, engine

    def fail(self, reason: str) -> None:
        self.classifier, self.engine, self.failure = None, None, reason

    def begin_draining(self) -> None:
        """A termination signal arrived: readiness turns 503, requests are still served."""
        self.draining = True

    def begin_shutdown(self) -> None:
        """The lifespan is exiting: nothing is served any more."""
        self.draining = self.stopped = True

    @property
    def not_ready_reason(self) -> str | None:
        """None when ready; otherwise the reason the readiness probe reports."""
        if self.draining:
            return SHUTTING_DOWN
        return self.unavailable_reason

    @property
    def unavailable_reason(self) -> str | None:
        """None while requests can be served (ready, or draining); otherwise why not."""
        if self.stopped:
            return SHUTTING_DOWN
        if self.classifier is None or self.engine is None:
            return self.failure
        return None
