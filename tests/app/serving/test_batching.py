"""The micro-batching engine on its own: batches form from what is queued, every caller gets its
own rows, failures stay inside their batch, deadlines are honoured and shutdown drains."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.errors import DeadlineExceeded, ModelNotReady
from app.serving.batching import BatchingEngine


class RecordingModel:
    """A stand-in model: output row = [sum of the input row, batch size]; it records batch sizes
    and can be held (to let a queue build up) or told to fail for inputs marked negative."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.running.set()
        self.gate.wait(5)
        self.batch_sizes.append(len(batch))
        if (batch < 0).any():
            raise RuntimeError("model failure")
        sums = batch.reshape(len(batch), -1).sum(axis=1)
        return np.stack([sums, np.full(len(batch), len(batch), dtype=batch.dtype)], axis=1)


def rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 1), value, dtype=np.float32)


async def started(engine: BatchingEngine) -> BatchingEngine:
    engine.start()
    return engine


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def run(coro):
    return asyncio.run(coro)


async def hold_busy(engine: BatchingEngine, model: RecordingModel, value: float = 1.0):
    """Start a first request and hold the model on it, so that what comes next has to queue."""
    model.gate.clear()
    first = asyncio.ensure_future(engine.infer(rows(value)))
    await wait_until(model.running.is_set)
    return first


def submit(engine: BatchingEngine, *values: float, deadline: float | None = None) -> list:
    return [asyncio.ensure_future(engine.infer(rows(v), deadline=deadline)) for v in values]


def test_a_lone_request_runs_at_once_as_a_batch_of_one() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=8, max_wait_s=0.0))
        t0 = time.perf_counter()
        out = await engine.infer(rows(1.0))
        assert time.perf_counter() - t0 < 0.5
        np.testing.assert_array_equal(out, [[4.0, 1.0]])
        assert model.batch_sizes == [1]
        await engine.aclose()

    run(scenario())


def test_requests_queued_while_the_model_is_busy_run_as_one_batch_and_get_their_own_rows() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=8))
        first = await hold_busy(engine, model, 0.0)
        others = submit(engine, 1.0, 2.0, 3.0, 4.0, 5.0)
        await wait_until(lambda: engine.queue_depth == 5)
        model.gate.set()
        results = await asyncio.gather(first, *others)
        assert model.batch_sizes == [1, 5]
        for i, out in enumerate(results):
            expected_batch = 1 if i == 0 else 5
            np.testing.assert_array_equal(out, [[4.0 * i, expected_batch]])
        await engine.aclose()

    run(scenario())


def test_batches_never_exceed_the_maximum_size() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=4))
        first = await hold_busy(engine, model, 0.0)
        others = submit(engine, *[1.0] * 10)
        await wait_until(lambda: engine.queue_depth == 10)
        model.gate.set()
        await asyncio.gather(first, *others)
        assert model.batch_sizes == [1, 4, 4, 2]
        await engine.aclose()

    run(scenario())


def test_max_wait_lets_a_batch_fill_before_it_runs() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=3, max_wait_s=0.5))
        tasks = []
        for i in range(3):
            tasks.append(asyncio.ensure_future(engine.infer(rows(float(i)))))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert model.batch_sizes == [3]  # full before the wait ran out
        t0 = time.perf_counter()
        await engine.infer(rows(1.0))  # alone: runs when the wait is over
        assert 0.4 < time.perf_counter() - t0 < 2.0
        assert model.batch_sizes == [3, 1]
        await engine.aclose()

    run(scenario())


def test_a_failing_batch_fails_only_its_own_callers() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=2))
        first = await hold_busy(engine, model)
        bad_batch = submit(engine, -1.0, 2.0)
        good_batch = submit(engine, 3.0)
        await wait_until(lambda: engine.queue_depth == 3)
        model.gate.set()
        np.testing.assert_array_equal(await first, [[4.0, 1.0]])
        for task in bad_batch:
            with pytest.raises(RuntimeError, match="model failure"):
                await task
        np.testing.assert_array_equal(await good_batch[0], [[12.0, 1.0]])
        assert model.batch_sizes == [1, 2, 1]
        np.testing.assert_array_equal(await engine.infer(rows(0.5)), [[2.0, 1.0]])
        await engine.aclose()

    run(scenario())


def test_callers_whose_deadline_passed_in_the_queue_are_refused_not_run() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=8))
        first = await hold_busy(engine, model)
        (expired,) = submit(engine, 2.0, deadline=time.perf_counter())
        (patient,) = submit(engine, 3.0, deadline=time.perf_counter() + 60)
        await wait_until(lambda: engine.queue_depth == 2)
        await asyncio.sleep(0.01)
        model.gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await expired
        np.testing.assert_array_equal(await patient, [[12.0, 1.0]])
        assert model.batch_sizes == [1, 1]
        await engine.aclose()

    run(scenario())


def test_shutdown_drains_the_queue_then_refuses_new_work() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=2))
        model.gate.clear()
        queued = submit(engine, 0.0, 1.0, 2.0, 3.0, 4.0)
        await wait_until(model.running.is_set)
        closing = asyncio.ensure_future(engine.aclose())
        await asyncio.sleep(0.01)
        assert not closing.done()  # still working through the queue
        model.gate.set()
        await closing
        results = await asyncio.gather(*queued)
        assert [float(r[0, 0]) for r in results] == [0.0, 4.0, 8.0, 12.0, 16.0]
        assert sum(model.batch_sizes) == 5
        with pytest.raises(ModelNotReady, match="shutting down"):
            await engine.infer(rows(1.0))

    run(scenario())


def test_a_caller_that_went_away_is_skipped() -> None:
    async def scenario() -> None:
        model = RecordingModel()
        engine = await started(BatchingEngine(model, max_batch_size=8))
        first = await hold_busy(engine, model)
        gone, stays = submit(engine, 2.0, 3.0)
        await wait_until(lambda: engine.queue_depth == 2)
        gone.cancel()
        model.gate.set()
        await first
        np.testing.assert_array_equal(await stays, [[12.0, 1.0]])
        assert model.batch_sizes == [1, 1]
        await engine.aclose()

    run(scenario())


def test_an_engine_that_was_never_started_refuses_work() -> None:
    async def scenario() -> None:
        engine = BatchingEngine(RecordingModel(), max_batch_size=2)
        with pytest.raises(ModelNotReady):
            await engine.infer(rows(1.0))

    run(scenario())


def test_a_broken_observer_fails_its_batch_but_not_the_loop() -> None:
    class Broken:
        calls = 0

        def batch_ran(self, size: int, queue_waits: list[float], run_seconds: float) -> None:
            Broken.calls += 1
            if Broken.calls == 1:
                raise RuntimeError("metrics bug")

    async def scenario() -> None:
        engine = await started(
            BatchingEngine(RecordingModel(), max_batch_size=4, observer=Broken())
        )
        with pytest.raises(RuntimeError, match="metrics bug"):
            await engine.infer(rows(1.0))
        np.testing.assert_array_equal(await engine.infer(rows(1.0)), [[4.0, 1.0]])
        await engine.aclose()

    run(scenario())
