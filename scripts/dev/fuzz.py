"""Send fuzzed DICOM to the real service and count what should never happen: 5xx answers and
dropped connections.

    .venv/bin/python -m scripts.dev.fuzz --mutants 20000    # writes runs/fuzz.json

Starts `uvicorn app.main:app` on 127.0.0.1 (the shipped model by default; `--url` targets a
service already running on the loopback instead), then sends mutants `0..N-1` of `--seed` from
`app.testing.fuzz` over keep-alive connections, from `--concurrency` threads: most as the raw body
of `POST /predict`, every `--batch-every`-th request a `POST /predict/batch` of `--batch-size`
fuzzed parts. Counted: the status of every answer and of every batch part, answers with
`Connection: close`, and connections that broke (a reset, a closed socket, no answer within
`--timeout`; the request named is the one that found the connection broken, which after a 500
is usually the next one on it). A 429/503 (the service full) is retried up to 3 times. Each
mutant that drew a 5xx or broke a connection is named by its id (`seed/index`:
`app.testing.fuzz.mutant` rebuilds it) and, with `--save`, written there as a file, ready to become
a regression test.
Afterwards the service must still be ready, and its log is searched for unhandled errors.
Loopback only; bounded by the mutant count and `--max-seconds`.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.testing.fuzz import Mutant, mutant, seed_files
from app.testing.server import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
BOUNDARY = "cxr-fuzz-boundary-7f3a9c"
RETRIES = 3


@dataclass
class Tally:
    """What the run saw; shared by the sender threads under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    part_statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    connection_close: int = 0
    retried: int = 0
    unanswered: int = 0  # still 429/503 after the retries
    five_xx: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    mutants: int = 0
    operators: collections.Counter[str] = field(default_factory=collections.Counter)


def batch_body(parts: list[Mutant]) -> bytes:
    chunks = []
    for made in parts:
        chunks.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{made.index}.dcm"\r\nContent-Type: application/dicom\r\n\r\n'.encode()
        )
        chunks.append(made.data + b"\r\n")
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


class Sender:
    """One thread's keep-alive connection to the service."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.connection = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def send(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes, bool]:
        """(status, body, whether the server said Connection: close); raises on a broken
        connection (the caller counts it and this sender reconnects)."""
        try:
            self.connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = self.connection.getresponse()
            data = response.read()
        except BaseException:
            self.connection.close()
            self.connection = self._connect()
            raise
        closing = (response.getheader("connection") or "").lower() == "close"
        if closing:  # http.client reopens on the next request
            self.connection.close()
        return response.status, data, closing


def run_job(sender: Sender, parts: list[Mutant], tally: Tally) -> None:
    single = len(parts) == 1
    path, content_type = (
        ("/predict", "application/dicom")
        if single
        else ("/predict/batch", f"multipart/form-data; boundary={BOUNDARY}")
    )
    body = parts[0].data if single else batch_body(parts)
    ids = ",".join(m.id for m in parts)
    for attempt in range(RETRIES + 1):
        try:
            status, data, closing = sender.send(path, body, content_type)
        except Exception as exc:
            with tally.lock:
                tally.dropped.append({"mutants": ids, "error": type(exc).__name__})
            return
        if status in (429, 503) and attempt < RETRIES:
            with tally.lock:
                tally.retried += 1
            time.sleep(0.05 * (attempt + 1))
            continue
        break
    with tally.lock:
        tally.requests["single" if single else "batch"] += 1
        tally.statuses[status] += 1
        tally.connection_close += closing
        if status in (429, 503):
            tally.unanswered += 1
        if status >= 500 and status != 503:
            tally.five_xx.append(ids)
        if not single and status == 200:
            for item, made in zip(json.loads(data)["results"], parts, strict=True):
                tally.part_statuses[item["status"]] += 1
                if item["status"] >= 500 and item["status"] != 503:
                    tally.five_xx.append(made.id)


def fuzz_over_http(
    host: str,
    port: int,
    count: int,
    seed: int,
    concurrency: int = 4,
    batch_every: int = 10,
    batch_size: int = 8,
    timeout_s: float = 30.0,
    max_seconds: float = 1800.0,
    seed_size: tuple[int, int] = (96, 80),
) -> dict[str, Any]:
    """Send mutants 0..count-1 of `seed` (of seed files `seed_size` rows x columns); the counts as
    a JSON-able dict."""
    seeds = seed_files(*seed_size)
    tally = Tally()
    next_index = [0, 0]  # next mutant, next job
    plan_lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def take() -> list[Mutant] | None:
        with plan_lock:
            start, job = next_index
            if start >= count or time.monotonic() > deadline:
                return None
            size = batch_size if batch_every and job % batch_every == batch_every - 1 else 1
            size = min(size, count - start)
            next_index[0], next_index[1] = start + size, job + 1
        return [mutant(seeds, seed, index) for index in range(start, start + size)]

    def work() -> None:
        sender = Sender(host, port, timeout_s)
        while (parts := take()) is not None:
            run_job(sender, parts, tally)
            with tally.lock:
                tally.mutants += len(parts)
                for made in parts:
                    tally.operators.update(made.operators)

    started = time.perf_counter()
    threads = [threading.Thread(target=work, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + 60)
    elapsed = time.perf_counter() - started
    return {
        "seed": seed,
        "mutants_sent": tally.mutants,
        "requests": dict(tally.requests),
        "elapsed_s": round(elapsed, 1),
        "mutants_per_s": round(tally.mutants / elapsed, 1) if elapsed else 0,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "batch_part_statuses": {str(k): v for k, v in sorted(tally.part_statuses.items())},
        "five_xx": len(tally.five_xx),
        "five_xx_mutants": tally.five_xx[:200],
        "dropped_connections": len(tally.dropped),
        "dropped": tally.dropped[:200],
        "connection_close_answers": tally.connection_close,
        "retried_429_503": tally.retried,
        "unanswered_429_503": tally.unanswered,
        "operators": dict(tally.operators.most_common()),
        "concurrency": concurrency,
        "batch": {"every": batch_every, "size": batch_size},
        "seed_size": list(seed_size),
    }


def markdown(result: dict[str, Any]) -> str:
    """One paragraph for a report."""
    parts = result["batch_part_statuses"]
    return (
        f"Fuzzed DICOM ({result['mutants_sent']} mutants of seed {result['seed']}, "
        f"{result['requests'].get('single', 0)} to `/predict` and "
        f"{result['requests'].get('batch', 0)} `/predict/batch` requests of "
        f"{result['batch']['size']} parts, {result['concurrency']} keep-alive connections, "
        f"{result['elapsed_s']} s): **{result['five_xx']} x 5xx, "
        f"{result['dropped_connections']} dropped connections**; answers "
        f"{', '.join(f'{k}: {v}' for k, v in result['statuses'].items())}; batch parts "
        f"{', '.join(f'{k}: {v}' for k, v in parts.items())}; ready afterwards: "
        f"{result.get('ready_after')}."
    )


def save_mutants(result: dict[str, Any], directory: Path) -> list[str]:
    """Write every mutant named in `five_xx_mutants` and `dropped` as `fuzz-<seed>-<index>.dcm`."""
    seeds = seed_files(*result["seed_size"])
    ids = set(result["five_xx_mutants"])
    ids |= {i for entry in result["dropped"] for i in entry["mutants"].split(",")}
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for id_ in sorted(ids):
        seed, index = (int(x) for x in id_.split("/"))
        made = mutant(seeds, seed, index)
        name = f"fuzz-{seed}-{index}-{made.operators[0]}.dcm"
        (directory / name).write_bytes(made.data)
        written.append(name)
    return written


def _ready(host: str, port: int) -> int | None:
    try:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", "/health/ready")
        return connection.getresponse().status
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mutants", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch-every", type=int, default=10, help="every n-th request a batch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--seed-size", type=int, nargs=2, default=(96, 80), metavar=("ROWS", "COLUMNS"))
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "pneumonia_cxr.json")
    p.add_argument("--url", help="a service already running on the loopback (else one is started)")
    p.add_argument("--save", type=Path, help="write the mutants that drew a 5xx or broke here")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "fuzz.json")
    args = p.parse_args(argv)

    server = None
    if args.url:
        parsed = urllib.parse.urlsplit(args.url)
        if parsed.hostname not in LOOPBACK:
            p.error("--url must be a loopback address")
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    else:
        settings = {
            "CXR_MODEL_METADATA": str(args.model),
            "CXR_PROVIDER": "cpu",
            "CXR_LOG_LEVEL": "WARNING",
            "CXR_DRAIN_SECONDS": "0",
        }
        server = ServiceProcess.start(None, settings)
        server.wait_until_ready(120.0)
        host, port = "127.0.0.1", server.port
    try:
        result = fuzz_over_http(
            host, port, args.mutants, args.seed, args.concurrency, args.batch_every,
            args.batch_size, args.timeout, args.max_seconds, tuple(args.seed_size),
        )  # fmt: skip
        result["ready_after"] = _ready(host, port)
        if server is not None:
            log = server.log()
            result["server_alive_after"] = server.process.poll() is None
            result["server_log_unhandled_errors"] = log.count("unhandled error")
            result["server_log_asgi_exceptions"] = log.count("Exception in ASGI application")
            result["service"] = f"uvicorn app.main:app, model {args.model.name}, CPU"
    finally:
        if server is not None:
            server.kill()
    if args.save:
        result["saved"] = save_mutants(result, args.save)
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    print(markdown(result))
    clean = result["five_xx"] == 0 and result["dropped_connections"] == 0
    return 0 if clean and result["ready_after"] == 200 else 1


if __name__ == "__main__":
    raise SystemExit(main())
