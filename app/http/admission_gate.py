"""The admission gate: uploads refused from their headers alone, before routing, dependency
resolution or a byte of the body, and health probes answered without either.

When the service is full, closed-loop clients that ignore `Retry-After` (many HTTP clients and
naive routers) come back at once. If each refusal cost a trip through the framework (routing,
dependencies, the error handler) and the connection then had to swallow the unread body to be
reused, refusals would take the cores the admitted uploads need, and goodput would collapse as
load grows. So `AdmissionGate`, a pure ASGI middleware in front of the application:

- for `POST` to the upload routes, asks `Admission.refusal` (a few comparisons; one that is only
  for uploads still arriving is asked again for up to 0.25 s, `settled_refusal`); when full, it
  answers 429 with `Retry-After` and `Connection: close` at once and never reads the body (the
  server closes the connection instead of reading what the client still sends); otherwise it
  opens the request's `UploadTicket` (bytes charged as they arrive, the image slot taken when the
  body is complete) and the body's `BodyPace` for the route;
- asks the server to close the connection after any answer sent before the body was read to its
  end (413, 429, 408, an error), so that no connection is kept only to drain a body;
- paces refusals (`RefusalPacer`): past `CXR_REFUSALS_PER_S`, a refusal is held unanswered,
  its body unread, until its turn (at most `Retry-After`). A held connection costs no CPU, and a
  client that retries as soon as it is answered then retries at most once per hold: without it,
  such clients come back as fast as they are refused, and the refusals take the cores;
- answers `GET`/`HEAD` `/health/live` and `/health/ready` itself (`app.http.probes.ProbeAnswers`),
  with the bodies the routes document (the routes stay for the OpenAPI document and for apps
  without the gate): a probe costs no routing and no dependency resolution while uploads queue.

It sits inside `RequestContextMiddleware` and `DrainMiddleware`, so its answers carry the request
id, are counted and logged, and a draining instance still answers 503.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ModelNotReady, Overloaded
from app.http.probes import LIVE_PATH, READY_PATH, ProbeAnswers
from app.http.slow_bodies import PACE_SCOPE_KEY, TICKET_SCOPE_KEY, BodyPace
from app.http.uploads import Framing
from app.ops.observability import request_context
from app.serving.admission import UploadsArriving
from app.serving.state import ServiceState

UPLOAD_PATHS = frozenset({"/predict", "/predict/batch", "/dicomweb/studies"})
UPLOAD_PREFIXES = ("/dicomweb/studies/",)
_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")


def is_upload(scope: Scope) -> bool:
    path: str = scope["path"]
    return scope["method"] == "POST" and (path in UPLOAD_PATHS or path.startswith(UPLOAD_PREFIXES))


class RefusalPacer:
    """When refusals may be answered: at `rate_per_s` on average with a second's worth at once
    (a generic cell rate algorithm), and past that each refusal held until its turn, at most
    `max_hold_s`. A refusal whose turn is further away than that is held `max_hold_s` without
    taking a turn: with N clients retrying at once, refusals then come at most N / `max_hold_s`
    per second. `rate_per_s` 0: never held."""

    BURST_S = 1.0

    def __init__(
        self,
        rate_per_s: float,
        max_hold_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self.max_hold_s = max_hold_s
        self._clock = clock
        self._turn = -math.inf  # when the next refusal is due, were they evenly spaced

    def hold_s(self) -> float:
        """Seconds to hold the refusal being answered now."""
        if not self.interval_s:
            return 0.0
        now = self._clock()
        turn = max(self._turn, now)
        wait = turn - now - self.BURST_S
        if wait > self.max_hold_s:
            return self.max_hold_s
        self._turn = turn + self.interval_s
        return max(0.0, wait)


class AdmissionGate:
    """Pure ASGI middleware; see the module docstring. `pace` is the uploads' minimum rate,
    `pacer` when refusals are answered (none: at once)."""

    def __init__(self, app: ASGIApp, pace: BodyPace, pacer: RefusalPacer | None = None) -> None:
        self.app = app
        self.pace = pace
        self.pacer = pacer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method in ("GET", "HEAD") and path in (LIVE_PATH, READY_PATH):
            await self._probe(scope, send, path)
            return
        if not is_upload(scope):
            await self.app(scope, receive, send)
            return
        state: ServiceState = scope["app"].state.service
        step = state.step
        if step is None or state.unavailable_reason is not None:
            await self._closing(scope, receive, send)  # the route answers 503 with the reason
            return
        admission = step.admission
        client = scope["client"][0] if scope.get("client") else None
        refused = admission.refusal(client)
        if isinstance(refused, UploadsArriving):
            refused = await admission.settled_refusal(refused, client)
        if refused is not None and not self._too_large(scope):
            await self._refuse(scope, send, refused)
            return
        with admission.receive(client) as ticket:
            scope[TICKET_SCOPE_KEY] = ticket
            scope[PACE_SCOPE_KEY] = self.pace
            await self._closing(scope, receive, send)

    async def _closing(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; ask for `Connection: close` on an answer that starts before the body was
        read to its end (the server would otherwise have to read the rest to reuse the
        connection)."""
        body_read = False

        async def tracking_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        await self.app(scope, tracking_receive, closing_send)

    def _too_large(self, scope: Scope) -> bool:
        """A declared length no wait makes acceptable gets its 413 from the route, not a 429."""
        settings = scope["app"].state.settings
        framing = Framing.of(Request(scope))
        limit = framing.body_limit(settings.max_upload_bytes)
        return framing.declared_length is not None and framing.declared_length > limit

    async def _refuse(self, scope: Scope, send: Send, refused: Overloaded) -> None:
        self._name_route(scope)
        request_context(Request(scope)).error_code = refused.code
        body = json.dumps({"error": {"code": refused.code, "message": refused.message}}).encode()
        headers = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(refused.retry_after_s or 1).encode()),
            _CLOSE,
        ]
        hold_s = self.pacer.hold_s() if self.pacer is not None else 0.0
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _probe(self, scope: Scope, send: Send, path: str) -> None:
        self._name_route(scope)
        answers: ProbeAnswers = scope["app"].state.probe_answers
        status, body = answers.answer(scope["app"].state.service, path)
        if status != HTTPStatus.OK:
            request_context(Request(scope)).error_code = ModelNotReady.code
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        head = scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if head else body})

    def _name_route(self, scope: Scope) -> None:
        """Give the access log and the request counter the route template, as routing would."""
        path: str = scope["path"]
        scope["route"] = _ROUTE_NAMES.get(path) or _RouteName(
            STOW_STUDY_TEMPLATE if path.startswith(UPLOAD_PREFIXES) else path
        )


@dataclass(frozen=True)
class _RouteName:
    """What `RequestContextMiddleware` reads of a route: its template."""

    path: str


STOW_STUDY_TEMPLATE = "/dicomweb/studies/{study}"
_ROUTE_NAMES = {path: _RouteName(path) for path in (*UPLOAD_PATHS, LIVE_PATH, READY_PATH)}
