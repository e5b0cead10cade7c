"""Application factory, lifespan and the `pneumonia-serve` entry point.

`uvicorn app.main:app` serves the module-level `app`; tests call `create_app(Settings(...))`.
Importing this module reads settings and builds routes, nothing more: the model is loaded in the
lifespan, so a missing or broken model leaves a live-but-not-ready service rather than a crash.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio.to_thread
import uvicorn
from fastapi import FastAPI

from app.api import router
from app.errors import ModelLoadError, install_error_handlers
from app.inference import load_classifier
from app.metrics import ServiceMetrics
from app.observability import RequestContextMiddleware, configure_logging
from app.prediction import start_prediction
from app.readiness import ServiceState
from app.schemas import DISCLAIMER
from app.settings import Settings

logger = logging.getLogger("app.lifecycle")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # A fresh state per start-up: an app object that is started again (tests do) must not keep
    # the previous run's draining flag.
    state = app.state.service = ServiceState()
    configure_logging(settings.log_level)
    started = time.perf_counter()
    try:
        # Off the event loop: hashing and session creation take a while for a real model.
        classifier = await anyio.to_thread.run_sync(load_classifier, settings)
    except ModelLoadError as exc:
        state.fail(str(exc))
        logger.error("model not ready", extra={"fields": {"reason": str(exc)}})
    else:
        state.serve(start_prediction(classifier, settings, app.state.metrics))
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
    _flip_readiness_on_signals(state)
    try:
        yield
    finally:
        state.begin_shutdown()
        logger.info("shutting down")
        if state.step is not None:
            await state.step.aclose()  # images already queued still get their answers


def _flip_readiness_on_signals(state: ServiceState) -> None:
    """Turn /health/ready to 503 the moment SIGTERM/SIGINT arrives, then let uvicorn shut down.

    uvicorn runs the lifespan's exit only after in-flight requests finish; a load balancer probing
    during that drain must already see "shutting down". The server's own handler (installed before
    the lifespan starts) is chained, not replaced. Signal handlers can only be set from the main
    thread, so under a test client (another thread) this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: object, previous: Callable[..., object] = previous) -> None:
            state.begin_shutdown()
            previous(signum, frame)

        signal.signal(sig, handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. `settings` defaults to the `CXR_*` environment (validated here)."""
    settings = settings or Settings()
    app = FastAPI(
        title="Pneumonia screening (chest X-ray)",
        version="0.1.0",
        description=f"ONNX Runtime inference for frontal chest X-rays. {DISCLAIMER}",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # Present before the lifespan runs, so probes answer 503 "model is loading" rather than fail.
    app.state.service = ServiceState()
    metrics = app.state.metrics = ServiceMetrics()
    metrics.watch_service(lambda: app.state.service)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(router)
    return app


app = create_app()


def run() -> None:
    """`pneumonia-serve`: run the service with uvicorn on `CXR_HOST`:`CXR_PORT`."""
    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # Our middleware writes the access log (structured, with request IDs); uvicorn's would
        # duplicate every line.
        access_log=False,
    )
