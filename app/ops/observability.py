"""Request IDs and one structured (JSON) log line per request.

What is logged is chosen so that no patient data can leak: no file names, no form fields, no
image content, no query strings, and the route template instead of the raw path. Upload size is
logged as a coarse bucket.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving.timing import NoObserver, PhaseObserver, RequestTimer

REQUEST_ID_HEADER = "X-Request-ID"
_SCOPE_KEY = "app.request_context"
# An incoming ID is echoed into logs and headers, so only a short, boring alphabet is trusted.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SIZE_BUCKETS = ((0, "0"), (64 * 1024, "<=64KiB"), (1 << 20, "<=1MiB"), (8 << 20, "<=8MiB"))

access_logger = logging.getLogger("app.access")


@dataclass
class RequestContext:
    """Per-request facts the route fills in and the access log reports. `timer` is the request's
    one clock: its phases are the answer's `timing_ms`, the histograms and the log's `*_ms`."""

    request_id: str
    timer: RequestTimer = field(default_factory=RequestTimer)
    body_bytes: int = 0
    error_code: str | None = None  # set by the error handlers
    fields: dict[str, Any] = field(default_factory=dict)


def new_request_id() -> str:
    """32 hex digits. Not a secret, only unique enough to find a request's log lines: from the
    interpreter's generator rather than `uuid4`, whose system call per request the event loop
    paid at every refusal."""
    return f"{random.getrandbits(128):032x}"


def request_context(request: Request) -> RequestContext:
    """The context `RequestContextMiddleware` attached to this request."""
    context = request.scope.get(_SCOPE_KEY)
    if not isinstance(context, RequestContext):  # app used without the middleware
        context = RequestContext(request_id=new_request_id())
        request.scope[_SCOPE_KEY] = context
    return context


def size_bucket(n_bytes: int) -> str:
    for upper, label in _SIZE_BUCKETS:
        if n_bytes <= upper:
            return label
    return ">8MiB"


class RequestObserver(PhaseObserver, Protocol):
    def request_done(self, route: str, method: str, status: int, code: str | None) -> None: ...


class RequestContextMiddleware:
    """Pure ASGI middleware (no body buffering, unlike BaseHTTPMiddleware): assigns the request
    ID, echoes it as `X-Request-ID`, counts body bytes, writes the access log line and reports
    the request to `metrics`."""

    def __init__(self, app: ASGIApp, metrics: RequestObserver | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"")
        incoming_id = incoming.decode("latin-1")
        request_id = incoming_id if _SANE_REQUEST_ID.match(incoming_id) else new_request_id()
        observer: PhaseObserver = self.metrics if self.metrics is not None else NoObserver()
        context = RequestContext(request_id=request_id, timer=RequestTimer(observer))
        scope[_SCOPE_KEY] = context
        status = 500  # what the client gets if the app raises before responding

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                context.body_bytes += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "<unmatched>")
            if self.metrics is not None:
                self.metrics.request_done(route, scope["method"], status, context.error_code)
            error = {"error_code": context.error_code} if context.error_code else {}
            phases = {f"{name}_ms": ms for name, ms in context.timer.phases_ms.items()}
            access_logger.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        # until the last byte was handed to the server (total_ms: until the
                        # answer was built, the figure in `timing_ms` and the histogram)
                        "duration_ms": round(context.timer.elapsed_ms(), 2),
                        "body_size": size_bucket(context.body_bytes),
                        **error,
                        **phases,
                        **context.fields,
                    }
                },
            )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields come from `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = redacted_traceback(record.exc_info[1])
        return json.dumps(entry, default=str)


def redacted_traceback(exc: BaseException) -> str:
    """Where `exc` was raised (each frame's file, line, function and source line) and its type,
    with its causes, but never its message: parsers' messages quote the values they stumbled on
    (a header value, a patient's name), and logs must not carry them."""
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if lines:
            lines.append("raised while handling or caused by:")
        lines.append("Traceback (most recent call last; the message is left out):")
        for frame in traceback.extract_tb(current.__traceback__):
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            if frame.line:
                lines.append(f"    {frame.line}")
        kind = type(current)
        lines.append(f"{kind.__module__}.{kind.__qualname__}")
        current = current.__cause__ or current.__context__
    return "\n".join(lines)


class _RedactExceptions(logging.Filter):
    """Makes a logger's tracebacks `redacted_traceback`s, whatever formatter prints them (the
    formatter uses `exc_text` when it is set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redacted_traceback(record.exc_info[1])
        return True


# Loggers outside `app` that print tracebacks of errors raised while serving a request.
_FOREIGN_TRACEBACK_LOGGERS = ("uvicorn.error", "asyncio")


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the `app` loggers, and tracebacks without exception messages from
    uvicorn's and asyncio's loggers too; idempotent (tests build many apps)."""
    for name in _FOREIGN_TRACEBACK_LOGGERS:
        foreign = logging.getLogger(name)
        if not any(isinstance(f, _RedactExceptions) for f in foreign.filters):
            foreign.addFilter(_RedactExceptions())
    logger = logging.getLogger("app")
    logger.setLevel(level)
    logger.propagate = False
    if not any(getattr(h, "_cxr_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._cxr_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
