"""Graceful draining: what happens between SIGTERM and the process exiting.

A load balancer notices that an instance is going away only at its next readiness probe (and
Kubernetes endpoints take a few seconds more to propagate), so requests keep arriving for a while
after the signal. On SIGTERM the service therefore:

1. turns `/health/ready` to 503 at once, but keeps its listening socket open and serves every
   request that still arrives, for `CXR_DRAIN_SECONDS` (the drain window);
2. when the window ends, answers every request not answered yet (waiting for a decode or an
   inference slot, or still uploading) with 503 `shutting_down` and `Retry-After`, in the one JSON
   error shape, so that clients retry on another instance instead of being cut off;
3. then hands over to uvicorn's own shutdown: stop listening, wait for what still runs in worker
   threads, run the lifespan exit.

When uvicorn's `--timeout-graceful-shutdown` expires it cancels the request tasks still running,
and on its own it would then answer a plain-text 500 and log a traceback; `DrainMiddleware` turns
that cancellation into the same JSON 503. SIGINT (Ctrl-C) skips the window: a terminal should stop
at once. A second SIGTERM ends the window early.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ShuttingDown
from app.http.errors import error_json
from app.serving.state import ServiceState

logger = logging.getLogger("app.lifecycle")

SHUTTING_DOWN_MESSAGE = "this instance is shutting down; retry the request"

ServerSignalHandler = Callable[[int, FrameType | None], object]


class Drain:
    """The requests in progress, and the drain sequence that answers them at shutdown.

    `DrainMiddleware` registers every HTTP request's cancel scope here; `close()` cancels those not
    answered yet. One per start-up, kept on `app.state.drain`.
    """

    def __init__(self, window_seconds: float, retry_after_s: int = 1) -> None:
        self.window_seconds = window_seconds
        # The service's one `Retry-After` (`CXR_RETRY_AFTER_S`), as for every other refusal.
        self.retry_after_s = retry_after_s
        self.closed = False
        self._pending: set[anyio.CancelScope] = set()
        self._window: asyncio.Task[None] | None = None
        self._handed_over = False
        self._on_draining: list[Callable[[], object]] = []

    def on_draining(self, callback: Callable[[], object]) -> None:
        """Run `callback` (blocking is fine: it runs in a worker thread) when draining begins."""
        self._on_draining.append(callback)

    @property
    def pending(self) -> int:
        """Requests registered and not answered yet."""
        return len(self._pending)

    def track(self, scope: anyio.CancelScope) -> None:
        self._pending.add(scope)

    def untrack(self, scope: anyio.CancelScope) -> None:
        self._pending.discard(scope)

    def close(self) -> int:
        """Stop serving: cancel every request not answered yet (each then gets a 503). Returns
        how many there were. Must run on the event loop."""
        self.closed = True
        pending = list(self._pending)
        for scope in pending:
            scope.cancel()
        return len(pending)

    def install_signal_handlers(self, state: ServiceState) -> None:
        """Chain SIGTERM/SIGINT handlers in front of the server's (uvicorn installs its own before
        the lifespan starts). Signal handlers can only be set from the main thread, so under a test
        client (another thread) this is a no-op. Call from the lifespan, on the event loop."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            server_handler = signal.getsignal(sig)
            if not callable(server_handler):
                continue

            def handler(
                signum: int,
                frame: FrameType | None,
                server_handler: ServerSignalHandler = server_handler,
            ) -> None:
                # Readiness first, synchronously: the very next probe must already see 503.
                state.begin_draining()
                if signum != signal.SIGTERM:
                    self._handed_over = True
                    server_handler(signum, frame)
                elif self._window is None:
                    loop.call_soon_threadsafe(self._open_window, server_handler, signum)
                else:
                    loop.call_soon_threadsafe(self._end_window, server_handler, signum)

            signal.signal(sig, handler)

    def _begin_draining_callbacks(self) -> None:
        for callback in self._on_draining:
            asyncio.get_running_loop().run_in_executor(None, callback)

    def _open_window(self, server_handler: ServerSignalHandler, signum: int) -> None:
        self._begin_draining_callbacks()
        logger.info(
            "draining",
            extra={
                "fields": {
                    "signal": signal.Signals(signum).name,
                    "drain_seconds": self.window_seconds,
                    "pending": self.pending,
                }
            },
        )
        self._window = asyncio.get_running_loop().create_task(
            self._wait_then_end(server_handler, signum)
        )

    async def _wait_then_end(self, server_handler: ServerSignalHandler, signum: int) -> None:
        await asyncio.sleep(self.window_seconds)
        self._end_window(server_handler, signum)

    def _end_window(self, server_handler: ServerSignalHandler, signum: int) -> None:
        if self._handed_over:
            return
        self._handed_over = True
        # Requests waiting for a slot get their 503 now; one already running in a worker thread
        # cannot be interrupted and usually still completes with its answer.
        unanswered = self.close()
        logger.info("drain window over", extra={"fields": {"unanswered": unanswered}})
        if self._window is not None and self._window is not asyncio.current_task():
            self._window.cancel()
        server_handler(signum, None)


async def send_shutting_down(
    scope: Scope, receive: Receive, send: Send, retry_after_s: int
) -> None:
    """Answer 503 `shutting_down` with `Retry-After`, and ask the client not to reuse the
    connection (this instance is about to close it)."""
    response = error_json(
        HTTPStatus.SERVICE_UNAVAILABLE,
        ShuttingDown.code,
        SHUTTING_DOWN_MESSAGE,
        {"Retry-After": str(retry_after_s), "Connection": "close"},
    )
    await response(scope, receive, send)


class DrainMiddleware:
    """Pure ASGI middleware: registers each HTTP request with the app's `Drain`, and answers a
    request that is cancelled before its response started (by the drain, or by the server's own
    shutdown timeout) with a JSON 503 instead of letting the cancellation reach the server.

    Sits inside `RequestContextMiddleware`, so the 503 carries the request id and is logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain: Drain = scope["app"].state.drain
        if drain.closed:
            await send_shutting_down(scope, receive, send, drain.retry_after_s)
            return
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            with anyio.CancelScope() as cancel_scope:
                drain.track(cancel_scope)
                try:
                    await self.app(scope, receive, tracking_send)
                finally:
                    drain.untrack(cancel_scope)
        except anyio.get_cancelled_exc_class():
            # Not the drain's cancellation but the server's (its graceful-shutdown timeout ran
            # out). Answer, and end the request here: re-raising would make uvicorn log a
            # traceback and send its own plain-text 500.
            if not response_started:
                await send_shutting_down(scope, receive, send, drain.retry_after_s)
            return
        if cancel_scope.cancelled_caught and not response_started:
            await send_shutting_down(scope, receive, send, drain.retry_after_s)
