"""What the service can do right now: serving a validated model, or not ready and why."""

from __future__ import annotations

from dataclasses import dataclass

from app.inference import Classifier
from app.prediction import PredictionStep

SHUTTING_DOWN = "shutting down"


@dataclass
class ServiceState:
    """Lives on `app.state.service`; the lifespan moves it through loading -> ready -> draining.

    Every transition is a plain attribute assignment made on the event loop, so readers (routes,
    probes) never see a half-updated state.
    """

    classifier: Classifier | None = None
    step: PredictionStep | None = None
    failure: str = "model is loading"
    draining: bool = False

    def serve(self, step: PredictionStep) -> None:
        self.classifier, self.step = step.classifier, step

    def fail(self, reason: str) -> None:
        self.classifier, self.step, self.failure = None, None, reason

    def begin_shutdown(self) -> None:
        # Flip readiness first so load balancers stop routing here before anything is released.
        self.draining = True

    @property
    def not_ready_reason(self) -> str | None:
        """None when ready; otherwise the reason the readiness probe reports."""
        if self.draining:
            return SHUTTING_DOWN
        if self.classifier is None or self.step is None:
            return self.failure
        return None
