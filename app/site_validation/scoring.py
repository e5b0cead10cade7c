"""Every case through the service's HTTP contract, as a client sends it: the file's bytes POSTed to
`/predict`, either to the real app built in this process (`create_app`, its lifespan run by
Starlette's TestClient) or to a running service at a URL. Nothing below the HTTP interface is
imported, so this stays valid however the service is organised inside.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx

API_KEY_ENV = "CXR_SITE_API_KEY"
MAX_ATTEMPTS = 6  # per image, for 429 / 503 with Retry-After and transport errors
MAX_RETRY_WAIT_S = 5.0
REQUEST_TIMEOUT_S = 120.0


class ServiceUnavailable(RuntimeError):
    """The service is not ready, or its answers do not fit the contract this tool reads."""


@dataclass(frozen=True)
class Answer:
    """One image's outcome: a probability from the service, or its refusal."""

    status: int
    p_positive: float | None = None
    threshold: float | None = None
    model_sha256: str | None = None
    error_code: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    sha256: str
    positive_class: str
    threshold: float
    target_sensitivity: float | None
    calibration: dict[str, Any]


# Starlette's TestClient is an httpx.Client whose transport is the app itself.
Poster = httpx.Client


def _headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    return {"X-API-Key": key} if key else {}


@contextmanager
def in_process_service(
    metadata: Path, provider: Literal["auto", "cpu", "cuda"] = "cpu"
) -> Iterator[Poster]:
    """The real service, built with `create_app` from the model's metadata JSON, in this process."""
    with warnings.catch_warnings():
        # Starlette's notice that its test client will move to another package: not ours to act on
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, model_metadata=metadata, provider=provider, log_level="WARNING"
    )
    with TestClient(create_app(settings), base_url="http://site-validation") as client:
        yield client


@contextmanager
def remote_service(url: str) -> Iterator[Poster]:
    """A running service at `url` (e.g. http://127.0.0.1:8000)."""
    with httpx.Client(base_url=url.rstrip("/"), timeout=REQUEST_TIMEOUT_S) as client:
        yield client


def open_service(service_url: str | None, metadata: Path) -> AbstractContextManager[Poster]:
    return remote_service(service_url) if service_url else in_process_service(metadata)


def served_model(client: Poster) -> ServedModel:
    """Wait (bounded) for readiness, then read the model's identity and decision from `/model`."""
    deadline = time.monotonic() + 120.0
    reason = "no answer"
    for _ in range(240):
        try:
            ready = client.get("/health/ready", headers=_headers())
        except httpx.TransportError as exc:
            reason = f"cannot reach the service ({type(exc).__name__})"
        else:
            if ready.status_code == 200:
                break
            reason = _error_message(ready)
            if ready.status_code == 503 and "loading" not in reason:
                raise ServiceUnavailable(f"the service is not ready: {reason}")
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"the service did not become ready in 120 s: {reason}")
        time.sleep(0.5)
    info = client.get("/model", headers=_headers())
    if info.status_code != 200:
        raise ServiceUnavailable(f"GET /model answered {info.status_code}: {_error_message(info)}")
    meta = info.json()
    decision = meta["decision"]
    return ServedModel(
        name=meta["name"],
        version=meta["version"],
        sha256=meta["sha256"],
        positive_class=decision["positive_class"],
        threshold=float(decision["threshold"]),
        target_sensitivity=decision.get("target_sensitivity"),
        calibration=dict(meta.get("calibration") or {}),
    )


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


def predict(client: Poster, data: bytes, positive_class: str) -> Answer:
    """POST one image's bytes to `/predict`; retries 429 and retryable 503s a bounded number of
    times, honouring Retry-After (capped)."""
    headers = {"Content-Type": "application/octet-stream", **_headers()}
    code = "transport_error"
    for attempt in range(MAX_ATTEMPTS):
        try:
            response = client.post("/predict", content=data, headers=headers)
        except httpx.TransportError:
            time.sleep(min(MAX_RETRY_WAIT_S, 0.5 * 2**attempt))
            continue
        if response.status_code == 200:
            body = response.json()
            # A service with a site profile loaded answers the site's probabilities; the model's
            # own are in `calibration`, and they are what a site is validated (again) on.
            own = (body.get("calibration") or {}).get("model_probabilities")
            return Answer(
                200,
                p_positive=float((own or body["probabilities"])[positive_class]),
                threshold=float(body["threshold"]),
                model_sha256=str(body["model"]["sha256"]),
                warnings=tuple(body.get("warnings") or ()),
            )
        code = _error_code(response)
        retry_after = response.headers.get("Retry-After")
        if response.status_code in (429, 503) and retry_after is not None:
            wait = float(retry_after) if retry_after.isdigit() else 1.0
            time.sleep(min(MAX_RETRY_WAIT_S, wait))
            continue
        return Answer(response.status_code, error_code=code)
    return Answer(0 if code == "transport_error" else 503, error_code=code)


class Progress:
    """A one-line progress bar on stderr (a line per tenth when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._shown_at = 0.0
        self._tenths = -1
        self._tty = self.stream.isatty()
        self._lock = threading.Lock()

    def advance(self) -> None:
        with self._lock:
            self._advance()

    def _advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self._tty:
            if now - self._shown_at >= 0.1 or self.done == self.total:
                self._shown_at = now
                self.stream.write("\r" + self._line(now))
                if self.done == self.total:
                    self.stream.write("\n")
                self.stream.flush()
        else:
            tenth = self.done * 10 // max(self.total, 1)
            if tenth != self._tenths:
                self._tenths = tenth
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def _line(self, now: float) -> str:
        width = 30
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(now - self.started, 1e-9)
        return (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {rate:.1f}/s"
        )


def score_all(
    client: Poster,
    paths: Sequence[Path],
    positive_class: str,
    concurrency: int = 4,
    read: Callable[[Path], bytes] = Path.read_bytes,
) -> list[tuple[Answer, str]]:
    """(answer, sha256 of the file's bytes) for `paths`, in order, with at most `concurrency`
    requests in flight. The digest finds byte-identical images, kept with one patient."""
    progress = Progress(len(paths), "scoring")

    def one(path: Path) -> tuple[Answer, str]:
        try:
            data = read(path)
        except OSError:
            progress.advance()
            return Answer(0, error_code="unreadable_file"), ""
        try:
            answer = predict(client, data, positive_class)
        finally:
            progress.advance()
        return answer, hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, paths))
