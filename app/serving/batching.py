"""The seam between the prediction step and the model: an awaitable `InferenceEngine`.

Callers only ever `await engine.infer(batch)`. `BatchingEngine` is the serving engine: requests
that arrive while the model is busy wait in one queue and run together as a single (N, ...) batch,
each caller getting its own rows back, so batching stays invisible to the prediction step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.to_thread
import numpy as np

from app.errors import DeadlineExceeded, ModelNotReady

logger = logging.getLogger(__name__)


class InferenceEngine(Protocol):
    async def infer(self, batch: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Calibrated probabilities (N, classes) for an (N, H, W, C) float32 batch.

        `deadline` is a `time.perf_counter()` value: work not started by then is refused with
        `DeadlineExceeded` rather than run for a caller that has given up.
        """
        ...

    @property
    def queue_depth(self) -> int:
        """Rows waiting for a model run."""
        ...

    async def aclose(self) -> None:
        """Take no new work; finish what is queued."""
        ...


class BatchObserver(Protocol):
    """What the engine reports about its work (the metrics implement it)."""

    def batch_ran(self, size: int, queue_waits: list[float], run_seconds: float) -> None: ...


@dataclass
class _Waiting:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    enqueued: float = field(default_factory=time.perf_counter)


class BatchingEngine:
    """Dynamic micro-batching over one model run at a time.

    The loop takes whatever is queued (up to `max_batch_size` rows), runs it as one batch in a
    worker thread and hands each caller its rows; requests arriving meanwhile form the next batch.
    So an idle service answers a lone request at once, and a busy one batches by itself. With
    `max_wait_s > 0` the loop also waits that long for a batch to fill before running a partial one.

    A batch that raises fails exactly the callers in it. Callers whose deadline has passed are
    refused before their batch is built. `aclose` stops taking new work and finishes the queue.
    Must be started (`start`) and closed on the event loop that serves the requests.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_wait_s: float = 0.0,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._observer = observer
        self._queue: deque[_Waiting] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # The model run gets a thread of its own; decoding uses other threads meanwhile.
        self._limiter = anyio.CapacityLimiter(1)

    @property
    def queue_depth(self) -> int:
        """Rows waiting for the model (not counting the batch that is running)."""
        return sum(len(item.rows) for item in self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="batching")

    async def aclose(self) -> None:
        """Refuse new work, let everything already queued run, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def infer(self, batch: np.ndarray, deadline: float | None = None) -> np.ndarray:
        if self._closing or self._task is None:
            raise ModelNotReady("shutting down" if self._closing else "the model is not running")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(batch, future, deadline))
        self._wakeup.set()
        return await future

    async def _serve(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._max_wait_s > 0:
                await self._fill_or_time_out()
            items = self._take()
            try:
                await self._run(items)
            except Exception as exc:  # a bug here must not stop the loop and strand every caller
                logger.exception("batching loop error")
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)

    async def _fill_or_time_out(self) -> None:
        oldest = self._queue[0].enqueued
        while self.queue_depth < self._max_batch_size and not self._closing:
            remaining = oldest + self._max_wait_s - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Waiting]:
        """The next batch: queued callers in arrival order, up to `max_batch_size` rows (a single
        caller with more rows than that runs alone). Cancelled or expired callers are dropped."""
        items: list[_Waiting] = []
        rows = 0
        now = time.perf_counter()
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # the caller went away
                self._queue.popleft()
                continue
            if item.deadline is not None and now > item.deadline:
                self._queue.popleft()
                item.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it waited for the model")
                )
                continue
            if items and rows + len(item.rows) > self._max_batch_size:
                break
            items.append(self._queue.popleft())
            rows += len(item.rows)
        return items

    async def _run(self, items: list[_Waiting]) -> None:
        if not items:
            return
        started = time.perf_counter()
        size = sum(len(i.rows) for i in items)
        try:
            batch = items[0].rows if len(items) == 1 else np.concatenate([i.rows for i in items])
            outputs = await anyio.to_thread.run_sync(self._run_batch, batch, limiter=self._limiter)
        except Exception as exc:
            # Only this batch's callers see the failure; the loop goes on with the next batch.
            logger.error("batch of %d failed: %s", size, type(exc).__name__)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            if self._observer is not None:
                waits = [started - i.enqueued for i in items]
                self._observer.batch_ran(size, waits, time.perf_counter() - started)
        offset = 0
        for item in items:
            n = len(item.rows)
            if not item.future.done():
                item.future.set_result(outputs[offset : offset + n])
            offset += n
