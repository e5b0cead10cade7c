"""The body of an upload as it arrives, held to a minimum transfer rate and charged to admission.

A client that declares a large body and then sends a few bytes per second would otherwise hold
its connection, its share of the upload budget and a request task for as long as it likes.
Every chunk must therefore arrive by `BodyPace.deadline`: the upload's grace after the headers
passed the admission gate, plus one second for every `min_bytes_per_s` already received. A body
that falls behind is cut off with 408 `upload_too_slow` (the gate then closes the connection). The
check is on the bytes received, never on the declared length, so a large declared length buys
nothing.

Each upload's grace is `grace_s` stretched by a random share of up to `GRACE_SPREAD`. Slow senders
that connect together and trickle alike would otherwise all fall behind in the same instant, and
the service would answer them in one turn of its event loop while normal requests waited behind
(docs/PERFORMANCE.md, "Overload and slow senders": the normal clients' p99 beside 300 slow senders).

Each chunk is also charged to the request's `UploadTicket` (`app.serving.admission`) as it
arrives, so admission holds the bytes really received, not the ones promised.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from starlette.requests import Request

from app.errors import UploadTooSlow
from app.serving.admission import Admission, UploadTicket

PACE_SCOPE_KEY = "app.body_pace"
TICKET_SCOPE_KEY = "app.upload_ticket"
GRACE_SPREAD = 0.5  # an upload's grace lies in [grace_s, (1 + GRACE_SPREAD) * grace_s)


@dataclass(frozen=True)
class BodyPace:
    """The minimum transfer rate of an upload body. `min_bytes_per_s` 0 turns it off."""

    grace_s: float
    min_bytes_per_s: int
    spread: float = GRACE_SPREAD

    @property
    def enforced(self) -> bool:
        return self.min_bytes_per_s > 0

    def for_upload(self, draw: Callable[[], float] = random.random) -> BodyPace:
        """The pace of one upload: `grace_s` stretched by `spread` times `draw()` (in [0, 1))."""
        return replace(self, grace_s=self.grace_s * (1.0 + self.spread * draw()), spread=0.0)

    def deadline(self, started: float, received: int) -> float:
        """The `time.monotonic()` by which more of the body must have arrived."""
        return started + self.grace_s + received / self.min_bytes_per_s


def upload_ticket(request: Request) -> UploadTicket | None:
    """The ticket the admission gate gave this request, if it went through the gate."""
    ticket = request.scope.get(TICKET_SCOPE_KEY)
    return ticket if isinstance(ticket, UploadTicket) else None


async def incoming_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive: `UploadTooSlow` when one is late by the
    request's `BodyPace`, `Overloaded` when the upload byte budget is spent."""
    pace = request.scope.get(PACE_SCOPE_KEY)
    ticket = upload_ticket(request)
    pace = pace.for_upload() if isinstance(pace, BodyPace) and pace.enforced else None
    started = ticket.started if ticket is not None else time.monotonic()
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            if pace is None:
                chunk = await chunks.__anext__()
            else:
                wait_s = pace.deadline(started, received) - time.monotonic()
                if wait_s <= 0:
                    raise _too_slow(pace, received, started)
                async with asyncio.timeout(wait_s):
                    chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            assert pace is not None
            raise _too_slow(pace, received, started) from None
        received += len(chunk)
        if ticket is not None and chunk:
            ticket.charge(len(chunk))
        yield chunk


def _too_slow(pace: BodyPace, received: int, started: float) -> UploadTooSlow:
    elapsed = time.monotonic() - started
    return UploadTooSlow(
        f"the upload arrived too slowly ({received} bytes in {elapsed:.1f} s; the minimum is "
        f"{pace.min_bytes_per_s} bytes/s after {pace.grace_s:g} s)"
    )


@contextmanager
def held_upload(request: Request, admission: Admission) -> Iterator[UploadTicket]:
    """The request's upload ticket: the gate's, or (an app without the gate) one opened here
    after the same refusal check."""
    ticket = upload_ticket(request)
    if ticket is not None:
        yield ticket
        return
    client = request.client.host if request.client else None
    refused = admission.refusal(client)
    if refused is not None:
        raise refused
    with admission.receive(client) as own:
        request.scope[TICKET_SCOPE_KEY] = own
        try:
            yield own
        finally:
            del request.scope[TICKET_SCOPE_KEY]
