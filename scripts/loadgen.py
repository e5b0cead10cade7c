"""A small HTTP/1.1 load generator for the benchmark: raw sockets on asyncio, keep-alive, requests
built once as bytes, so the client spends as little of the machine's CPU as possible on itself.

Only for 127.0.0.1 and bounded runs: `closed_loop` keeps `concurrency` connections busy for a
fixed time, `burst` sends one request on each of `n` connections at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

CONNECTION_ERROR = 0  # the status recorded when no HTTP response came back


def build_request(path: str, body: bytes, content_type: str, host: str = "127.0.0.1") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


@dataclass
class Outcome:
    started: float
    seconds: float
    status: int


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_seconds: float = 0.0

    def summary(self) -> dict:
        ok = [o.seconds * 1000.0 for o in self.outcomes if o.status == 200]
        refused = [o.seconds * 1000.0 for o in self.outcomes if o.status in (429, 503)]
        statuses = Counter(str(o.status) for o in self.outcomes)
        return {
            "requests": len(self.outcomes),
            "ok": len(ok),
            "ok_per_s": round(len(ok) / self.wall_seconds, 1) if self.wall_seconds else 0.0,
            "wall_s": round(self.wall_seconds, 2),
            "latency_ms": _percentiles(ok),
            "refusal_latency_ms": _percentiles(refused),
            "statuses": dict(sorted(statuses.items())),
        }


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "p99": round(float(p99), 1),
        "max": round(max(values), 1),
    }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, server wants the connection closed), after reading the whole response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


class _Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def send(self, request: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            if self.writer is None:
                await self.open()
            assert self.reader is not None and self.writer is not None
            self.writer.write(request)
            await self.writer.drain()
            status, close = await _read_response(self.reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await self.close()
            return Outcome(started, time.perf_counter() - started, CONNECTION_ERROR)
        if close:
            await self.close()
        return Outcome(started, time.perf_counter() - started, status)


async def closed_loop(
    port: int, requests: list[bytes], concurrency: int, seconds: float, warmup_s: float = 1.0
) -> LoadResult:
    """`concurrency` connections, each sending its next request as soon as the previous one is
    answered, for `warmup_s + seconds`; only the last `seconds` are reported."""
    result = LoadResult()
    begin = time.perf_counter()
    measure_from = begin + warmup_s
    stop_at = measure_from + seconds

    async def worker(index: int) -> None:
        connection = _Connection(port)
        n = index
        while time.perf_counter() < stop_at:
            outcome = await connection.send(requests[n % len(requests)])
            n += concurrency
            if outcome.started >= measure_from and outcome.started + outcome.seconds <= stop_at:
                result.outcomes.append(outcome)
        await connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.wall_seconds = seconds
    return result


async def burst(port: int, requests: list[bytes], n: int) -> LoadResult:
    """Open `n` connections, then send one request on each at the same moment."""
    connections = [_Connection(port) for _ in range(n)]
    await asyncio.gather(*(c.open() for c in connections))
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(c.send(requests[i % len(requests)]) for i, c in enumerate(connections))
    )
    wall = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in connections))
    return LoadResult(outcomes=list(outcomes), wall_seconds=wall)
