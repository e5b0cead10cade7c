"""A small HTTP/1.1 load generator for the benchmark: raw sockets on asyncio, keep-alive, requests
built once as bytes, so the client spends as little of the machine's CPU as possible on itself.

Only for 127.0.0.1 and bounded runs: `closed_loop` keeps `concurrency` connections busy for a
fixed time (each sends its next request as soon as the last is answered, ignoring `Retry-After`,
as naive clients do), `burst` sends one request on each of `n` connections at the same instant,
`probe_latencies` polls the health probes from a process of its own (so that the load
generator's own event loop does not delay it), and `slow_senders` holds connections that send
their headers or bodies a few bytes per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import socket
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
            # The server may answer and close before the body is sent (a refusal from the
            # headers): its answer is still there to read, as a browser or curl reads it.
            with contextlib.suppress(OSError):
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


# -- health probes, polled as a kubelet does: a new connection each time -------------------------


def _probe_once(port: int, path: str, timeout_s: float) -> tuple[float, int]:
    started = time.perf_counter()
    status = CONNECTION_ERROR
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n" not in head:
                data = sock.recv(4096)
                if not data:
                    break
                head += data
            if head.startswith(b"HTTP/1.1 "):
                status = int(head.split(b" ", 2)[1])
    except OSError:
        pass
    return (time.perf_counter() - started) * 1000.0, status


def _poll_probes(targets, seconds: float, interval_s: float, timeout_s: float, out) -> None:
    samples: dict[str, list[tuple[float, int]]] = {label: [] for label, _, _ in targets}
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        for label, port, path in targets:
            samples[label].append(_probe_once(port, path, timeout_s))
        time.sleep(interval_s)
    out.send(samples)
    out.close()


def probe_targets(port: int, probe_port: int | None = None) -> list[tuple[str, int, str]]:
    """(label, port, path) of both probes on the main port, and on the probe port if any."""
    targets = [(path, port, path) for path in ("/health/live", "/health/ready")]
    if probe_port:
        targets += [
            (f"probe port {path}", probe_port, path) for path in ("/health/live", "/health/ready")
        ]
    return targets


class ProbePoller:
    """Polls the (label, port, path) targets in turn, `interval_s` between rounds, for `seconds`,
    from a forked process (so that neither the load generator nor its event loop delays the
    probes), each on a new connection with a `timeout_s` timeout, as a kubelet does."""

    def __init__(
        self,
        targets: list[tuple[str, int, str]],
        seconds: float,
        interval_s: float = 0.05,
        timeout_s: float = 5.0,
    ) -> None:
        context = multiprocessing.get_context("fork")
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_poll_probes, args=(targets, seconds, interval_s, timeout_s, sender), daemon=True
        )
        self._process.start()
        self._seconds = seconds

    def result(self) -> dict:
        """Per target: count, statuses, and latency max / p99 / p50 in ms."""
        samples = self._receiver.recv() if self._receiver.poll(self._seconds + 30) else {}
        self._process.join(10)
        report = {}
        for label, values in samples.items():
            latencies = [ms for ms, _ in values]
            statuses = Counter(str(status) for _, status in values)
            report[label] = {
                "probes": len(values),
                "statuses": dict(sorted(statuses.items())),
                "latency_ms": _percentiles(latencies),
            }
        return report


# -- slow senders ---------------------------------------------------------------------------------


@dataclass
class SlowResult:
    connections: int = 0
    answered: Counter = field(default_factory=Counter)  # status of the answers they got
    closed_by_server: int = 0  # the server closed the connection without an answer
    open_at_end: int = 0  # still sending when the phase ended
    held_s: list[float] = field(default_factory=list)  # how long each was let go on

    def summary(self) -> dict:
        return {
            "connections_opened": self.connections,
            "answered": dict(sorted((str(k), v) for k, v in self.answered.items())),
            "closed_by_server": self.closed_by_server,
            "still_open_at_end": self.open_at_end,
            "held_s": _percentiles(self.held_s),
        }


async def slow_senders(
    port: int, n: int, seconds: float, declared_length: int, bytes_per_s: float = 4.0
) -> SlowResult:
    """`n` connections, for `seconds`: half send their headers a few bytes at a time, half send
    complete headers declaring `declared_length` bytes of body and then the body a few bytes at a
    time; each reconnects when the server cuts it off."""
    result = SlowResult()
    stop_at = time.perf_counter() + seconds
    body_head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {declared_length}\r\n\r\n"
    ).encode()
    slow_head = body_head  # trickled byte by byte, headers included

    async def one(index: int) -> None:
        slow_headers = index % 2 == 0
        while time.perf_counter() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            result.connections += 1
            opened = time.perf_counter()
            if not slow_headers:
                writer.write(body_head)
            answer = asyncio.ensure_future(reader.read(4096))
            position = 0
            try:
                while time.perf_counter() < stop_at and not answer.done():
                    if not slow_headers:
                        writer.write(b"\xff")
                    elif position < len(slow_head):
                        writer.write(slow_head[position : position + 1])
                    position += 1
                    await asyncio.wait([answer], timeout=1.0 / bytes_per_s)
                if answer.done():
                    data = answer.result()
                    if data.startswith(b"HTTP/1.1 "):
                        result.answered[int(data.split(b" ", 2)[1])] += 1
                    else:
                        result.closed_by_server += 1
                    result.held_s.append(time.perf_counter() - opened)
                else:
                    result.open_at_end += 1
            except OSError:
                result.closed_by_server += 1
                result.held_s.append(time.perf_counter() - opened)
            finally:
                answer.cancel()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.gather(*(one(i) for i in range(n)))
    return result


def _slow_in_child(port: int, n: int, seconds: float, declared_length: int, out) -> None:
    started = time.perf_counter()
    summary = asyncio.run(slow_senders(port, n, seconds, declared_length)).summary()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # The cores this process took from the machine the service shares with it.
    summary["cpu_cores"] = round(
        (usage.ru_utime + usage.ru_stime) / (time.perf_counter() - started), 2
    )
    out.send(summary)
    out.close()


class SlowSenders:
    """`slow_senders` in a forked process of their own, so that their trickling does not slow
    the load generator that measures the normal clients beside them."""

    def __init__(self, port: int, n: int, seconds: float, declared_length: int) -> None:
        context = multiprocessing.get_context("fork")
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_slow_in_child, args=(port, n, seconds, declared_length, sender), daemon=True
        )
        self._process.start()
        self._seconds = seconds

    def result(self) -> dict:
        summary = self._receiver.recv() if self._receiver.poll(self._seconds + 60) else {}
        self._process.join(10)
        return summary
