"""What the service can do right now: serving a validated model, or not ready and why."""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.model.classifier import Classifier
from app.serving.prediction import PredictionStep

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
    step: PredictionStep | None = None
    failure: str = "model is loading"
    draining: bool = False
    stopped: bool = False
    loop_beat: float | None = None  # time.monotonic() of the event loop's last heartbeat
    # A part that could not start while the rest serves (the C-STORE listener on a port that is
    # taken): readiness and `GET /model` carry this reason; None when everything started.
    dicom_listener_down: str | None = None

    def loop_silence_s(self) -> float:
        """Seconds since the event loop last beat (0 before its first beat)."""
        beat = self.loop_beat
        return 0.0 if beat is None else max(0.0, time.monotonic() - beat)

    def serve(self, step: PredictionStep) -> None:
        self.classifier, self.step = step.classifier, step

    def fail(self, reason: str) -> None:
        self.classifier, self.step, self.failure = None, None, reason

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
        if self.step is not None:  # up, but not finishing any work: send it elsewhere
            stalled = self.step.admission.stalled_reason()
            if stalled is not None:
                return stalled
        return self.unavailable_reason

    @property
    def unavailable_reason(self) -> str | None:
        """None while requests can be served (ready, or draining); otherwise why not."""
        if self.stopped:
            return SHUTTING_DOWN
        if self.classifier is None or self.step is None:
            return self.failure
        return None
