"""Prometheus metrics, served at `GET /metrics` in the text exposition format.

One registry per app (tests build many apps in one process). The model is one uvicorn worker per
container: scale out with containers (or pods), each scraped on its own, so no multiprocess mode.

No label is ever taken from request content: routes are templates, statuses and error codes come
from closed sets, phases and model fields are ours. Nothing about a patient or an image can end up
in a label value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.audit import AuditTrail
from app.contract import ProbabilityReference
from app.ops.drift import DriftMetrics
from app.pacs.pipeline import ResultsPipeline
from app.serving.prediction import PredictionStep, ServedAnswer
from app.serving.state import ServiceState
from app.serving.timing import PHASES

# Seconds: from a 1 ms decode of a small JPEG to requests that waited in a full queue.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """The service's metrics on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cxr_http_requests",
            "HTTP requests answered, by route template, method, status and error code "
            "(`ok` for success).",
            ["route", "method", "status", "code"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "cxr_phase_seconds",
            "Time per image in each phase: upload_read (receiving the body), decode (decode and "
            "preprocess), queue_wait (waiting for a model run), inference (the batched model run), "
            "total (arrival to answer, per request).",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cxr_inference_batch_size",
            "Images per model run.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "cxr_inference_queue_depth", "Images waiting for a model run.", registry=r
        )
        self.in_flight = Gauge(
            "cxr_in_flight_images",
            "Images admitted and not yet answered (reading, decoding, queued or running).",
            registry=r,
        )
        self.in_flight_limit = Gauge(
            "cxr_in_flight_images_limit",
            "Admission limit: past it, new work is refused with 429.",
            registry=r,
        )
        self.decode_budget_bytes = Gauge(
            "cxr_decode_memory_reserved_bytes",
            "Estimated memory reserved by decodes in progress (bounded by the decode budget).",
            registry=r,
        )
        self.slow_headers = Counter(
            "cxr_slow_headers_closed",
            "Connections answered 408 `headers_too_slow` and closed: a request's headers took "
            "longer than CXR_HEADER_TIMEOUT_S (counted when served by `pneumonia-serve`).",
            registry=r,
        )
        self.model = Info("cxr_model", "The served model and execution provider.", registry=r)
        self.ready = Gauge("cxr_ready", "1 when /health/ready answers 200, else 0.", registry=r)
        for phase in PHASES:  # every phase series exists from the first scrape
            self.phase_seconds.labels(phase)
        self.drift = DriftMetrics(r)  # answers, inputs and the drift score (`app.ops.drift`)

    # -- reporting --------------------------------------------------------------------------------

    def request_done(self, route: str, method: str, status: int, code: str | None) -> None:
        self.requests.labels(route, method, str(status), code or "ok").inc()

    def headers_too_slow(self) -> None:
        self.slow_headers.inc()

    def phase(self, name: str, seconds: float) -> None:
        self.phase_seconds.labels(name).observe(seconds)

    def batch_ran(self, size: int, queue_waits: list[float], run_seconds: float) -> None:
        """`BatchObserver`: one model run of `size` images."""
        self.batch_size.observe(size)
        queue = self.phase_seconds.labels("queue_wait")
        for wait in queue_waits:
            queue.observe(wait)
        inference = self.phase_seconds.labels("inference")
        for _ in queue_waits:
            inference.observe(run_seconds)

    def watch_service(self, service: Callable[[], ServiceState]) -> None:
        """Read readiness, queue, admission and decode-budget gauges from the current service
        state at scrape time (the lifespan replaces the state object on every start)."""
        self.ready.set_function(lambda: 1.0 if service().not_ready_reason is None else 0.0)

        def from_step(read: Callable[[PredictionStep], float]) -> Callable[[], float]:
            def value() -> float:
                step = service().step
                return 0.0 if step is None else float(read(step))

            return value

        self.queue_depth.set_function(from_step(lambda s: s.queue_depth))
        self.in_flight.set_function(from_step(lambda s: s.admission.images))
        self.in_flight_limit.set_function(from_step(lambda s: s.admission.max_images))
        self.decode_budget_bytes.set_function(from_step(lambda s: s.decode_budget.reserved_bytes))

    def watch_pacs(self, pipeline: Callable[[], ResultsPipeline | None]) -> None:
        """Results and intake metrics, read from the current pipeline at scrape time."""
        self.registry.register(_PacsCollector(pipeline))

    def watch_audit(self, audit: Callable[[], AuditTrail | None]) -> None:
        """Audit messages sent to the collector and dropped, read at scrape time."""
        self.registry.register(_AuditCollector(audit))

    def model_loaded(self, name: str, version: str, sha256: str, provider: str) -> None:
        self.model.info(
            {"name": name, "version": version, "sha256": sha256, "execution_provider": provider}
        )

    def drift_reference(
        self, reference: ProbabilityReference | None, window: int, classes: list[str]
    ) -> None:
        self.drift.use_reference(reference, window, classes)

    def answered(self, answer: ServedAnswer) -> None:
        """`AnswerObserver`: one image answered."""
        self.drift.answered(answer)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _AuditCollector(Collector):
    def __init__(self, audit: Callable[[], AuditTrail | None]) -> None:
        self._audit = audit

    def collect(self) -> Iterator[Metric]:
        audit = self._audit()
        if audit is None:
            return
        messages = CounterMetricFamily(
            "cxr_audit_messages",
            "Audit messages by outcome: sent to the collector, or dropped (the collector "
            "unreachable, or the queue to it full).",
            labels=["outcome"],
        )
        messages.add_metric(["sent"], audit.sent)
        messages.add_metric(["dropped"], audit.dropped)
        yield messages


class _PacsCollector(Collector):
    """DICOM networking, read at scrape time: the outbox by destination and state, delivery
    attempts, the oldest undelivered result, and intake outcomes. Labels are closed sets:
    destinations are `dicomweb`/`dimse` (PACS) and `hl7`/`fhir` (RIS), states and outcomes are
    codes of ours."""

    def __init__(self, pipeline: Callable[[], ResultsPipeline | None]) -> None:
        self._pipeline = pipeline

    def describe(self) -> list[Metric]:
        return []  # collected lazily: the pipeline exists only once the model is ready

    def collect(self) -> Iterator[Metric]:
        pipeline = self._pipeline()
        if pipeline is None:
            return
        queued = GaugeMetricFamily(
            "cxr_results_deliveries",
            "Result objects in the outbox, by destination and state (pending: queued or being "
            "retried; delivered: kept until the retention passes; failed: given up, kept).",
            labels=["destination", "state"],
        )
        stats = pipeline.outbox.stats()
        for (state, destination), count in sorted(stats.counts.items()):
            queued.add_metric([destination, state], count)
        yield queued
        oldest = GaugeMetricFamily(
            "cxr_results_oldest_undelivered_age_seconds",
            "Age of the oldest result object not yet delivered (0 when none is waiting).",
        )
        oldest.add_metric([], stats.oldest_pending_age_s or 0.0)
        yield oldest
        attempts = CounterMetricFamily(
            "cxr_results_delivery_attempts",
            "Delivery attempts by destination and outcome (delivered, retry, failed).",
            labels=["destination", "outcome"],
        )
        if pipeline.worker is not None:
            for (destination, outcome), count in sorted(
                pipeline.worker.counts_by_destination.items()
            ):
                attempts.add_metric([destination, outcome], count)
        yield attempts
        intake = CounterMetricFamily(
            "cxr_intake_instances",
            "DICOM instances by intake (stow, dimse, predict) and outcome: stored/spooled, "
            "recorded (result objects made), refused:<code>, ignored_* (C-STORE answered success "
            "without a result: another SOP class, or not a frontal chest X-ray); for dimse also "
            "associations_*, rejected_calling_ae / rejected_source_address (callers "
            "CXR_DICOM_PEERS does not list, or lists for another address), "
            "rejected_by_negotiation, the bounds' aborted_pdu_too_long / aborted_read_deadline / "
            "aborted_instance_too_large "
            "/ aborted_buffers_full / aborted_malformed_pdu, refused_too_many_connections and "
            "refused_header_reads_busy.",
            labels=["intake", "outcome"],
        )
        for key, count in sorted(pipeline.stats.items()):
            source, _, outcome = key.partition(":")
            intake.add_metric([source, outcome], count)
        if pipeline.listener is not None:
            for name, count in sorted(pipeline.listener.stats.snapshot().items()):
                intake.add_metric(["dimse", name], count)
        yield intake
        spool = GaugeMetricFamily(
            "cxr_intake_spool_pending", "Received DICOM instances waiting to be read."
        )
        spool.add_metric([], pipeline.spool.pending_count())
        yield spool
