"""Application factory, lifespan and the `pneumonia-serve` entry point.

`uvicorn app.main:app` serves the module-level `app`; tests call `create_app(Settings(...))`.
Importing this module reads settings and builds routes, nothing more: the model is loaded in the
lifespan, so a missing or broken model leaves a live-but-not-ready service rather than a crash.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import uvicorn
from fastapi import FastAPI

from app.audit import AuditEvent, AuditTrail, Participant
from app.contract import DISCLAIMER
from app.errors import ModelLoadError
from app.http import schemas
from app.http.admission_gate import AdmissionGate, RefusalPacer
from app.http.auth import ApiKeys, document_api_keys
from app.http.browser_guard import BrowserGuard
from app.http.dicomweb import router as dicomweb_router
from app.http.docs import install_docs
from app.http.draining import Drain, DrainMiddleware
from app.http.errors import install_error_handlers
from app.http.openapi import document_limits
from app.http.probes import ProbeAnswers, ProbeServer
from app.http.protocol import with_header_timeout
from app.http.results import router as results_router
from app.http.routes import router
from app.http.slow_bodies import BodyPace
from app.http.viewer import router as viewer_router
from app.model.gpu import preload_cuda_libraries
from app.model.loading import load_classifier
from app.ops.memory import return_large_blocks_to_the_os
from app.ops.metrics import ServiceMetrics
from app.ops.observability import RequestContextMiddleware, configure_logging
from app.pacs.delivery import DimseDestination, client_tls_context
from app.pacs.outbox import OutboxUnavailable, RetentionSweeper
from app.pacs.pipeline import ResultsPipeline
from app.pacs.scp import ListenerRefused, listener_from_settings
from app.serving.prediction import Prediction, PredictionStep, start_prediction
from app.serving.state import ServiceState
from app.settings import Settings

logger = logging.getLogger("app.lifecycle")
GRACEFUL_SHUTDOWN_S = 10  # uvicorn's wait for running work after the drain (`run`)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # A fresh state per start-up: an app object that is started again (tests do) must not keep
    # the previous run's draining flag.
    state = app.state.service = ServiceState()
    drain = app.state.drain = Drain(settings.drain_seconds, settings.retry_after_s)
    configure_logging(settings.log_level)
    heartbeat = asyncio.create_task(_beat(state), name="cxr-loop-heartbeat")
    probes = None
    if settings.probe_port is not None:
        # From the start, so that liveness answers while the model loads.
        probes = ProbeServer(
            settings.probe_host,
            settings.probe_port,
            lambda: app.state.service,
            app.state.probe_answers,
        )
        probes.start()
    keys: ApiKeys = app.state.api_keys
    logger.info("api keys", extra={"fields": {"required": keys.required, "configured": len(keys)}})
    audit = app.state.audit = audit_trail_from(settings)
    for name in settings.clear_credentials:
        logger.warning(
            "credentials in clear",
            extra={"fields": {"setting": name, "reason": "its destination URL is http://"}},
        )
    started = time.perf_counter()
    try:
        # Off the event loop: hashing and session creation take a while for a real model. The CUDA
        # libraries (GPU image only) must be in the process before the first session is created.
        await anyio.to_thread.run_sync(preload_cuda_libraries, settings)
        classifier = await anyio.to_thread.run_sync(load_classifier, settings)
    except ModelLoadError as exc:
        state.fail(str(exc))
        logger.error("model not ready", extra={"fields": {"reason": str(exc)}})
    else:
        step = start_prediction(classifier, settings, app.state.metrics)
        try:
            app.state.pipeline = await start_results_pipeline(settings, step)
        except Exception as exc:  # a state dir, database or port that cannot be used
            reason = networking_failure_reason(exc, settings)
            state.fail(reason)
            logger.error("dicom networking not ready", extra={"fields": {"reason": reason}})
            await step.aclose()
        else:
            pipeline_started = app.state.pipeline
            if pipeline_started is not None and audit is not None:
                audit_pipeline(pipeline_started, audit)
            if pipeline_started is not None:
                # A C-STORE port that is taken is a fact served by readiness and `/model`, not a
                # service that refuses every upload.
                state.dicom_listener_down = pipeline_started.listener_down
                # With no destination there is no delivery worker, which purges expired results
                # as it goes: a sweeper does it instead, so that results leave on time anyway.
                if pipeline_started.worker is None:
                    retention_s = settings.results_retention_s
                    app.state.retention = RetentionSweeper(
                        pipeline_started.outbox, retention_s, every_s=min(600.0, retention_s / 10)
                    )
                    app.state.retention.start()
            state.serve(step)
        meta = classifier.metadata
        logger.info(
            "model ready",
            extra={
                "fields": {
                    "model": meta.name,
                    "version": meta.version,
                    "sha256": meta.sha256,
                    "execution_provider": classifier.execution_provider,
                    "startup_ms": round((time.perf_counter() - started) * 1000.0, 1),
                }
            },
        )
    # SIGTERM: readiness 503 at once, serve on through the drain window, then uvicorn's shutdown.
    # The C-STORE listener takes no new association from the signal on; running ones finish.
    pipeline: ResultsPipeline | None = app.state.pipeline
    if pipeline is not None:
        drain.on_draining(lambda: pipeline.stop_listening(settings.drain_seconds))
    drain.install_signal_handlers(state)
    try:
        yield
    finally:
        state.begin_shutdown()
        heartbeat.cancel()
        if probes is not None:
            probes.close()
        logger.info("shutting down")
        retention: RetentionSweeper | None = app.state.retention
        if retention is not None:
            await anyio.to_thread.run_sync(retention.stop)
            app.state.retention = None
        if pipeline is not None:
            await pipeline.aclose(settings.drain_seconds)
            app.state.pipeline = None
        if state.step is not None:
            await state.step.aclose()  # images already queued still get their answers
        if audit is not None:
            await anyio.to_thread.run_sync(audit.close)
            app.state.audit = None


def audit_trail_from(settings: Settings) -> AuditTrail | None:
    """The audit trail to the site's collector (`CXR_AUDIT_SYSLOG`), TLS when a CA is given."""
    address = settings.audit_address
    if address is None:
        return None
    tls = None
    if settings.audit_tls_ca_file is not None:
        tls = ssl.create_default_context(cafile=str(settings.audit_tls_ca_file))
        if settings.audit_tls_cert_file is not None and settings.audit_tls_key_file is not None:
            tls.load_cert_chain(settings.audit_tls_cert_file, settings.audit_tls_key_file)
    logger.info(
        "audit trail",
        extra={"fields": {"collector": f"{address[0]}:{address[1]}", "tls": tls is not None}},
    )
    return AuditTrail(*address, source_id=settings.audit_source_id, tls=tls)


def audit_pipeline(pipeline: ResultsPipeline, audit: AuditTrail) -> None:
    """Instances the intakes put on the spool, and results the delivery worker hands over."""

    def received(sop_instance_uid: str, meta: dict[str, Any]) -> None:
        requestor = str(meta.get("calling_ae") or meta.get("source") or "unknown")
        audit.record(
            AuditEvent(
                "instances_received",
                participants=(
                    Participant(requestor, True, role=("110153", "Source Role ID")),
                    Participant(audit.source_id, False, role=("110152", "Destination Role ID")),
                ),
                sop_instance_uids=(sop_instance_uid,),
            )
        )

    def alert(reason: str, calling_ae: str | None, address: str | None) -> None:
        audit.record(
            AuditEvent(
                "security_alert",
                outcome="minor_failure",
                participants=(Participant(calling_ae or "unknown", True, address),),
                detail=reason,
            )
        )

    pipeline.spool.on_stored = received
    if pipeline.listener is not None:
        pipeline.listener.on_security_alert = alert
    if pipeline.worker is not None:
        pipeline.worker.audit = audit


def networking_failure_reason(exc: Exception, settings: Settings) -> str:
    """The not-ready reason when DICOM networking cannot start: the error's text helps with a
    state directory or a port, but never where it may come from the database driver, whose
    messages can quote CXR_STATE_URL (password included); a fixed reason is served then."""
    text = f"{type(exc).__name__}: {exc}"
    url = settings.state_url.get_secret_value() if settings.state_url else None
    if url is not None:
        password = urlsplit(url).password
        from_driver = isinstance(exc, OutboxUnavailable) or type(exc).__module__.startswith(
            "psycopg"
        )
        if from_driver or any(secret and secret in text for secret in (url, password)):
            text = f"the results database (CXR_STATE_URL) cannot be used ({type(exc).__name__})"
    return f"DICOM networking could not start: {text}"[:300]


async def _beat(state: ServiceState, every_s: float = 0.5) -> None:
    """The event loop's heartbeat, read by the probes (`ProbeAnswers`)."""
    while True:
        state.loop_beat = time.monotonic()
        await asyncio.sleep(every_s)


async def start_results_pipeline(
    settings: Settings, step: PredictionStep
) -> ResultsPipeline | None:
    """DICOM networking (results outbox and delivery, STOW-RS and C-STORE intake) when the
    settings give it a state directory; None otherwise."""
    if settings.state_dir is None:
        return None
    classifier = step.classifier

    def shape_answer(prediction: Prediction, request_id: str) -> dict[str, Any]:
        total_ms = round(prediction.decode_ms + prediction.inference_ms, 2)
        answer = schemas.prediction_response(prediction, classifier, request_id, total_ms)
        return answer.model_dump(mode="json")

    # C-STORE results over DICOM TLS; a CA, certificate or key that cannot be read fails the
    # start of DICOM networking (not ready, with the reason), before anything is opened.
    dimse_tls = (
        client_tls_context(
            settings.results_dimse_tls_ca,
            settings.results_dimse_tls_cert,
            settings.results_dimse_tls_key,
        )
        if settings.results_dimse_tls_ca is not None
        else None
    )
    pipeline = await anyio.to_thread.run_sync(ResultsPipeline, settings, step, shape_answer)
    pipeline.outbox.max_results = settings.results_max_stored  # CXR_RESULTS_MAX_STORED
    if dimse_tls is not None:
        for destination in pipeline.destinations:
            if isinstance(destination, DimseDestination):
                destination.tls = dimse_tls
    if settings.dicom_port is not None:
        # The C-STORE listener admits the peers the site lists (`listener_from_settings`), and
        # with none listed, and no CXR_DICOM_OPEN, it does not start while the rest serves.
        outbox = pipeline.outbox
        try:
            pipeline.listener = listener_from_settings(
                settings, pipeline.spool, pipeline.gate, room=lambda: not outbox.is_full()
            )
        except ListenerRefused as exc:
            pipeline.listener, pipeline.listener_down = None, str(exc)
            logger.error("dicom listener not started", extra={"fields": {"reason": str(exc)}})
    pipeline.start()
    return pipeline


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. `settings` defaults to the `CXR_*` environment (validated here)."""
    settings = settings or Settings()
    return_large_blocks_to_the_os()
    app = FastAPI(
        title="Pneumonia screening (chest X-ray)",
        version="0.1.0",
        description=f"ONNX Runtime inference for frontal chest X-rays. {DISCLAIMER}",
        lifespan=lifespan,
        # FastAPI's own pages load their assets from a CDN; install_docs serves them locally.
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    # Present before the lifespan runs, so probes answer 503 "model is loading" rather than fail.
    app.state.service = ServiceState()
    app.state.pipeline = None
    app.state.retention = None
    app.state.audit = None
    app.state.probe_answers = ProbeAnswers(settings.loop_stall_s)
    app.state.drain = Drain(settings.drain_seconds, settings.retry_after_s)
    # Read here, not in the lifespan: a key file that cannot be used stops the process at once
    # rather than leaving it up and open.
    app.state.api_keys = ApiKeys.from_settings(settings)
    document_api_keys(app)
    document_limits(app)
    metrics = app.state.metrics = ServiceMetrics()
    metrics.watch_service(lambda: app.state.service)
    metrics.watch_pacs(lambda: app.state.pipeline)
    metrics.watch_audit(lambda: app.state.audit)
    install_error_handlers(app)
    # The last added is the outermost: request ids, the access log and the request metrics wrap
    # the drain's 503s and the admission gate's 429s and probe answers.
    pace = BodyPace(settings.upload_grace_s, settings.upload_min_bytes_per_s)
    pacer = RefusalPacer(settings.refusals_per_s, settings.refusal_max_hold_s)
    app.add_middleware(AdmissionGate, pace=pace, pacer=pacer)
    # Before admission: a cross-site post or an unknown host is refused before its body is read.
    app.add_middleware(
        BrowserGuard,
        trusted_hosts=settings.trusted_host_names,
        allowed_origins=settings.allowed_origin_names,
    )
    app.add_middleware(DrainMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(router)
    app.include_router(dicomweb_router)
    app.include_router(results_router)
    app.include_router(viewer_router)
    return app


app = create_app()


def run() -> None:
    """`pneumonia-serve`: run the service with uvicorn on `CXR_HOST`:`CXR_PORT` (the container's
    command; `uvicorn app.main:app` serves the same app without the header deadline)."""
    settings = Settings()
    app = create_app(settings)
    metrics: ServiceMetrics = app.state.metrics
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # HTTPS on the service's own port when a certificate is configured (CXR_TLS_CERT_FILE)
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        # Our middleware writes the access log (structured, with request IDs); uvicorn's would
        # duplicate every line.
        access_log=False,
        # After the drain window only work already in worker threads is left; this bounds it.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # uvicorn's httptools protocol, with a deadline on each request's headers.
        http=with_header_timeout(settings.header_timeout_s, metrics.headers_too_slow),
    )
