"""Admission control: how much work the service takes on, so that overload is refused at the door
instead of turning into unbounded latency and memory.

Two gates, both sized in `Settings`:

- `Admission` (event loop): images in flight and upload bytes in flight. A request that would pass
  either bound is refused at once, before its body is read, with 429 and `Retry-After` (Triton's
  `max_queue_size`, BentoML's `max_concurrency`). Health probes and /metrics never pass through it.
- `DecodeBudget` (decode threads): the memory that decodes in progress may hold, reserved from each
  image's header before its pixels are decompressed. A large image waits for room; small ones pass.

`app.ops.memory.return_large_blocks_to_the_os` makes the budget hold for the process, not only for
live objects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import Overloaded


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


class Admission:
    """Bounded in-flight work. Single-threaded: call it on the event loop only."""

    def __init__(self, max_images: int, max_upload_bytes: int, retry_after_s: int) -> None:
        self.max_images = max_images
        self.max_upload_bytes = max_upload_bytes
        self.retry_after_s = retry_after_s
        self.images = 0
        self.upload_bytes = 0

    @contextmanager
    def admit(self, images: int, upload_bytes: int) -> Iterator[AdmissionTicket]:
        """Hold `images` and `upload_bytes` for the block, or raise `Overloaded` at once."""
        self._take(images, upload_bytes)
        ticket = AdmissionTicket(self, images, upload_bytes)
        try:
            yield ticket
        finally:
            self.images -= ticket.images
            self.upload_bytes -= ticket.upload_bytes

    def _take(self, images: int, upload_bytes: int) -> None:
        if self.images + images > self.max_images:
            raise Overloaded(
                f"the service is at capacity ({self.images} images in flight, limit "
                f"{self.max_images}); retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        # A request larger than the whole budget is still taken when nothing else is in flight.
        if self.upload_bytes and self.upload_bytes + upload_bytes > self.max_upload_bytes:
            raise Overloaded(
                f"the service is receiving {self.upload_bytes} bytes of uploads already (limit "
                f"{self.max_upload_bytes}); retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self.images += images
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
