"""One clock per request: the phases it reports fill the answer's `timing_ms`, the phase histograms
and the access log line, from the same numbers, so the three cannot disagree.

The serving stage only knows the `PhaseObserver` protocol; the metrics (`app.ops.metrics`)
implement it, and the HTTP layer creates a `RequestTimer` per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

# The phases of one image's way through the service, in order.
PHASES = ("upload_read", "decode", "queue_wait", "inference", "total")


class PhaseObserver(Protocol):
    """Where phase durations go (the Prometheus histograms)."""

    def phase(self, name: str, seconds: float) -> None: ...


class NoObserver:
    """A `PhaseObserver` that drops everything (tools and tests that need no metrics)."""

    def phase(self, name: str, seconds: float) -> None:
        return None


@dataclass
class RequestTimer:
    """A request's clock. `record` reports a phase to the observer and keeps its milliseconds
    (summed over the images of a multi-image request); `finish` records `total` once."""

    observer: PhaseObserver = field(default_factory=NoObserver)
    started: float = field(default_factory=time.perf_counter)
    phases_ms: dict[str, float] = field(default_factory=dict)

    def record(self, phase: str, seconds: float, observe: bool = True) -> float:
        """Report `seconds` spent in `phase`; returns the milliseconds as the answer shows them.
        `observe=False` keeps the figure for the answer and the log only (a phase whose histogram
        is filled elsewhere, e.g. per model run by the batching engine)."""
        if observe:
            self.observer.phase(phase, seconds)
        ms = round(seconds * 1000.0, 2)
        self.phases_ms[phase] = round(self.phases_ms.get(phase, 0.0) + ms, 2)
        return ms

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def finish(self) -> float:
        """Record the `total` phase (arrival to answer) once and return it in milliseconds."""
        if "total" not in self.phases_ms:
            self.record("total", time.perf_counter() - self.started)
        return self.phases_ms["total"]
