"""Admission control: how much work the service takes on, so that overload is refused at the door
instead of turning into unbounded latency and memory.

Two gates, both sized in `Settings`:

- `Admission` (event loop): images in flight and upload bytes in flight. A request that would pass
  either bound is refused at once, before its body is read, with 429 and `Retry-After` (Triton's
  `max_queue_size`, BentoML's `max_concurrency`). Health probes and /metrics never pass through it.
  An HTTP upload is admitted in two steps (`receive`, then `UploadTicket.take_image`): while its
  body arrives it holds only the bytes that have actually arrived, and takes an image slot once the
  body is complete, so that a slow sender holds no slot. Uploads still receiving in their first
  `PENDING_S` count against the free slots, so that the gate does not let through more bodies
  than there are slots to take them (a body read in full only to be refused costs the event loop
  as much as an answer); slow ones (under
  `PENDING_MIN_BYTES_PER_S`) stop counting sooner (the minimum transfer rate cuts them off,
  `app.http.slow_bodies`); a refusal for arriving uploads alone is looked at again for up to
  `PENDING_S` before it is answered (`settled_refusal`). With a per-client share,
  one client address may hold at most that fraction of the image limit in uploads.
- `DecodeBudget` (decode threads): the memory that decodes in progress may hold, reserved from each
  image's header before its pixels are decompressed. A large image waits for room; small ones pass.

`app.ops.memory.return_large_blocks_to_the_os` makes the budget hold for the process, not only for
live objects.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import Overloaded

# How long a receiving upload counts as pending (against the bound on uploads let through): at
# most PENDING_S, and past PENDING_MIN_S only while it arrives at PENDING_MIN_BYTES_PER_S or more
# (an upload over a 10 Mbit/s link does; a sender trickling bytes does not).
PENDING_S = 0.25
PENDING_MIN_S = 0.05
PENDING_MIN_BYTES_PER_S = 1 << 20


class UploadsArriving(Overloaded):
    """Refused only because uploads still arriving fill the free image slots. Within PENDING_S
    each of them is in or stops counting, so the gate looks again before answering (slow senders
    cut off together reconnect together, and would otherwise fill the count for an instant)."""


class AdmissionTicket:
    """What one admitted request holds; give it back with `release` (or use `Admission.admit`)."""

    def __init__(self, admission: Admission, images: int, upload_bytes: int) -> None:
        self._admission = admission
        self.images = images
        self.upload_bytes = upload_bytes

    def grow(self, images: int) -> None:
        """Take `images` more (a multi-image request learns its count after reading the body)."""
        self._admission._take(images, 0)
        self.images += images


class UploadTicket(AdmissionTicket):
    """An HTTP upload from the moment its headers passed the gate: it holds the bytes that have
    arrived (`charge`), then one image slot (`take_image`) once its body is complete."""

    def __init__(self, admission: Admission, client: str | None) -> None:
        super().__init__(admission, 0, 0)
        self.client = client
        self.started = time.monotonic()
        self.pending = True  # counted in `Admission.pending`
        self.slot_since = 0.0  # when it took its image slot
        self.body_complete = False
        self.done = False

    def charge(self, nbytes: int) -> None:
        """`nbytes` more of the body arrived; `Overloaded` when the byte budget is spent."""
        admission = self._admission
        if (
            admission.upload_bytes > self.upload_bytes
            and admission.upload_bytes + nbytes > admission.max_upload_bytes
        ):
            raise admission.overloaded(
                f"the service is receiving {admission.upload_bytes} bytes of uploads already "
                f"(limit {admission.max_upload_bytes})"
            )
        admission.upload_bytes += nbytes
        self.upload_bytes += nbytes

    async def take_image(self, timeout_s: float) -> None:
        """The body is complete: take one image slot, waiting up to `timeout_s` for one when all
        are taken (the gate let this upload in when there was room), else `Overloaded`."""
        self.body_complete = True
        await self._admission._take_waiting(self, timeout_s)


class AdaptiveLimit:
    """An image limit that follows the machine, in the manner of CoDel: what matters is the
    standing queue, seen as the smallest time an image held its slot (decode, queue and model)
    over an interval. Above `target_s` for a whole interval, in-flight work only adds waiting, so
    the limit shrinks by a tenth (not below `floor`); at or under it while uploads were refused,
    the limit was what held them back, so it grows by one (not above `ceiling`)."""

    def __init__(self, ceiling: int, floor: int, target_s: float, interval_s: float = 0.5) -> None:
        self.ceiling = ceiling
        self.floor = max(1, min(floor, ceiling))
        self.target_s = target_s
        self.interval_s = interval_s
        self.limit = ceiling
        self._interval_ends: float | None = None
        self._min_sojourn = float("inf")
        self._refused = False

    def refused(self) -> None:
        self._refused = True

    def observe(self, sojourn_s: float, now: float) -> int:
        """One image gave its slot back after `sojourn_s`; returns the limit from now on."""
        self._min_sojourn = min(self._min_sojourn, sojourn_s)
        if self._interval_ends is None:
            self._interval_ends = now + self.interval_s
        elif now >= self._interval_ends:
            if self._min_sojourn > self.target_s:
                self.limit = max(self.floor, int(self.limit * 0.9))
            elif self._refused:
                self.limit = min(self.ceiling, self.limit + 1)
            self._interval_ends = now + self.interval_s
            self._min_sojourn = float("inf")
            self._refused = False
        return self.limit


class Admission:
    """Bounded in-flight work. Single-threaded: call it on the event loop only. `max_images` is
    the limit in force: the configured one, or what `adaptive` makes of it."""

    def __init__(
        self,
        max_images: int,
        max_upload_bytes: int,
        retry_after_s: int,
        max_client_share: float = 1.0,
        adaptive: AdaptiveLimit | None = None,
        stall_s: float = 0.0,
    ) -> None:
        self.max_images = max_images
        self.adaptive = adaptive
        self.stall_s = stall_s
        # The last time an image gave its slot back, or work began after an idle spell.
        self.last_progress = time.monotonic()
        self.max_upload_bytes = max_upload_bytes
        self.retry_after_s = retry_after_s
        self.images = 0
        self.upload_bytes = 0
        self.pending = 0  # receiving uploads still in their first PENDING_S, or waiting for a slot
        # With a share below 1, what one client address may hold (receiving or in flight).
        self.max_per_client = (
            max(1, int(max_images * max_client_share)) if max_client_share < 1.0 else None
        )
        self.per_client: dict[str, int] = {}
        self._pending_order: deque[UploadTicket] = deque()
        self._slot_waiters: deque[tuple[asyncio.Future[None], UploadTicket]] = deque()

    def overloaded(self, reason: str, error: type[Overloaded] = Overloaded) -> Overloaded:
        return error(
            f"{reason}; retry after {self.retry_after_s} s", retry_after_s=self.retry_after_s
        )

    def refusal(self, client: str | None = None) -> Overloaded | None:
        """Why an upload from `client` would be refused now, from its headers alone (None: it may
        come in). Costs a few comparisons: the gate asks it before anything else is done."""
        if self.images >= self.max_images:
            if self.adaptive is not None:
                self.adaptive.refused()
            return self.overloaded(
                f"the service is at capacity ({self.images} images in flight, limit "
                f"{self.max_images})"
            )
        # Uploads arriving count with the images in flight: each is let in only when a slot will
        # be there once its body is complete, rather than read in full and then refused.
        free = self.max_images - self.images
        if self.pending >= free and self._age_pending() >= free:
            return self.overloaded(
                f"{self.pending} uploads are arriving for the {free} free image slots",
                UploadsArriving,
            )
        if self.upload_bytes >= self.max_upload_bytes:
            return self.overloaded(
                f"the service is receiving {self.upload_bytes} bytes of uploads already "
                f"(limit {self.max_upload_bytes})"
            )
        limit = self.max_per_client
        if limit is not None and client is not None and self.per_client.get(client, 0) >= limit:
            return self.overloaded(f"this client holds its share of the service ({limit} uploads)")
        return None

    async def settled_refusal(
        self, refused: Overloaded | None, client: str | None = None
    ) -> Overloaded | None:
        """`refused` (what `refusal` just said), or, while it is only for uploads still arriving,
        `refusal` asked again every PENDING_MIN_S for up to PENDING_S: by then those uploads are
        in (holding slots) or slow (no longer counted)."""
        waited = 0.0
        while isinstance(refused, UploadsArriving) and waited < PENDING_S:
            await asyncio.sleep(PENDING_MIN_S)
            waited += PENDING_MIN_S
            refused = self.refusal(client)
        return refused

    @contextmanager
    def receive(self, client: str | None = None) -> Iterator[UploadTicket]:
        """Hold an upload from its headers on (see `UploadTicket`); everything it took is given
        back when the block ends. Call `refusal` first: this does not refuse."""
        ticket = UploadTicket(self, client)
        self.pending += 1
        self._pending_order.append(ticket)
        if len(self._pending_order) > 2 * self.max_images + 16:
            self._age_pending()  # keeps the list to what is pending
        if client is not None and self.max_per_client is not None:
            self.per_client[client] = self.per_client.get(client, 0) + 1
        try:
            yield ticket
        finally:
            ticket.done = True
            self._not_pending(ticket)
            if ticket.images:
                self._slot_given_back(ticket.slot_since)
            self.images -= ticket.images
            self.upload_bytes -= ticket.upload_bytes
            if client is not None and self.max_per_client is not None:
                left = self.per_client[client] - 1
                if left:
                    self.per_client[client] = left
                else:
                    del self.per_client[client]
            if ticket.images:
                self._wake_waiters()

    def _took(self, images: int) -> None:
        if not self.images:
            self.last_progress = time.monotonic()
        self.images += images

    def _slot_given_back(self, since: float) -> None:
        now = self.last_progress = time.monotonic()
        if self.adaptive is not None:
            self.max_images = self.adaptive.observe(now - since, now)

    def stalled_reason(self) -> str | None:
        """Why the service cannot take work although it is up: images are in flight and none has
        finished for `stall_s` (a decoder or the model stuck). None otherwise, or with stall_s 0."""
        if not self.stall_s or not self.images:
            return None
        idle = time.monotonic() - self.last_progress
        if idle < self.stall_s:
            return None
        return f"stalled: {self.images} images in flight and none finished for {idle:.0f} s"

    def _not_pending(self, ticket: UploadTicket) -> None:
        if ticket.pending:
            ticket.pending = False
            self.pending -= 1

    def _age_pending(self) -> int:
        """Stop counting as pending the uploads that are slow (receiving for PENDING_S, or past
        PENDING_MIN_S at under PENDING_MIN_BYTES_PER_S): the minimum transfer rate deals with
        those. Drops finished tickets from the list too. Returns what is still pending."""
        now = time.monotonic()
        kept: deque[UploadTicket] = deque()
        for ticket in self._pending_order:
            if not ticket.pending:
                continue
            age = now - ticket.started
            slow = age >= PENDING_S or (
                age >= PENDING_MIN_S and ticket.upload_bytes < PENDING_MIN_BYTES_PER_S * age
            )
            if slow and not ticket.body_complete:
                self._not_pending(ticket)
            else:
                kept.append(ticket)
        self._pending_order = kept
        return self.pending

    async def _take_waiting(self, ticket: UploadTicket, timeout_s: float) -> None:
        self._not_pending(ticket)
        if self.images < self.max_images and not self._slot_waiters:
            self._took(1)
            ticket.images += 1
            ticket.slot_since = time.monotonic()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append((waiter, ticket))
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            if not ticket.images:
                raise self.overloaded(
                    f"the service is at capacity ({self.images} images in flight, limit "
                    f"{self.max_images})"
                ) from None
        finally:
            self._slot_waiters = deque(w for w in self._slot_waiters if w[0] is not waiter)

    def _wake_waiters(self) -> None:
        """Hand free slots to the uploads waiting for one, in order (the slot is the ticket's
        from here on, so `receive` gives it back whatever becomes of the waiting task)."""
        while self._slot_waiters and self.images < self.max_images:
            waiter, ticket = self._slot_waiters.popleft()
            if waiter.done() or ticket.done:
                continue
            self.images += 1
            ticket.images += 1
            ticket.slot_since = time.monotonic()
            waiter.set_result(None)

    @contextmanager
    def admit(self, images: int, upload_bytes: int) -> Iterator[AdmissionTicket]:
        """Hold `images` and `upload_bytes` for the block, or raise `Overloaded` at once (the
        intakes that hold a whole upload before asking: DICOM networking, STOW-RS)."""
        self._take(images, upload_bytes)
        ticket = AdmissionTicket(self, images, upload_bytes)
        since = time.monotonic()
        try:
            yield ticket
        finally:
            self._slot_given_back(since)
            self.images -= ticket.images
            self.upload_bytes -= ticket.upload_bytes
            self._wake_waiters()

    def _take(self, images: int, upload_bytes: int) -> None:
        if self.images + images > self.max_images:
            raise self.overloaded(
                f"the service is at capacity ({self.images} images in flight, limit "
                f"{self.max_images})"
            )
        # A request larger than the whole budget is still taken when nothing else is in flight.
        if self.upload_bytes and self.upload_bytes + upload_bytes > self.max_upload_bytes:
            raise self.overloaded(
                f"the service is receiving {self.upload_bytes} bytes of uploads already (limit "
                f"{self.max_upload_bytes})"
            )
        self._took(images)
        self.upload_bytes += upload_bytes


class DecodeBudget:
    """Memory shared by concurrent decodes, in bytes. Thread-safe; `hold` blocks until there is
    room. One reservation larger than the whole budget is cut to the budget, so it runs alone
    rather than never."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._reserved = 0
        self._room = threading.Condition()

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        amount = max(0, min(nbytes, self.capacity_bytes))
        with self._room:
            while self._reserved + amount > self.capacity_bytes:
                self._room.wait()
            self._reserved += amount
        try:
            yield
        finally:
            with self._room:
                self._reserved -= amount
                self._room.notify_all()
