"""The service as a real process: `pneumonia-serve` (or, for another app or with uvicorn's own
options, `python -m uvicorn`) on 127.0.0.1, configured only
through `CXR_*` variables (the caller's own `CXR_*` environment is dropped), its output captured
in a log file. Tests and the benchmark both start the service this way; the benchmark also reads
the process's CPU time and memory from /proc.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.settings import PROJECT_ROOT

_TICKS = os.sysconf("SC_CLK_TCK")
SERVICE_APP = "app.main:app"


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default if the
    file cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the ephemeral range where there is room: a port the
    kernel handed out (bind to 0) can be taken by any outgoing connection, ours or a peer's such
    as Orthanc's, before the server binds it, which once failed a start with EADDRINUSE."""
    low, _ = _ephemeral_ports()
    if low > 12000:
        for _ in range(50):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        return found


def http_status(port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """The status of `GET path` on 127.0.0.1:port, or None when nothing answers."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        connection.request("GET", path)
        status = connection.getresponse().status
        connection.close()
        return status
    except OSError:
        return None


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started: float = field(default_factory=time.perf_counter)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        log_path: Path | None,
        settings: dict[str, str],
        uvicorn_args: Sequence[str] = (),
        app: str = SERVICE_APP,
        root: Path = PROJECT_ROOT,
        port: int | None = None,
    ) -> ServiceProcess:
        """Start the service found in `root` (the checkout by default) with `settings`, on
        `port` (a free one by default)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
        env.update(settings)
        if root != PROJECT_ROOT:
            env["PYTHONPATH"] = str(root)
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="cxr-service-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        port = port or free_port()
        if app == SERVICE_APP and not uvicorn_args:
            # As the container runs it: `pneumonia-serve` (uvicorn with the header deadline).
            env.update(CXR_HOST="127.0.0.1", CXR_PORT=str(port))
            command = [sys.executable, "-c", "from app.main import run; run()"]
        else:
            command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
            command += ["--port", str(port), "--no-access-log", *uvicorn_args]
        started = time.perf_counter()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(process, port, log_path, started)

    @classmethod
    @contextmanager
    def serving(
        cls,
        log_path: Path,
        settings: dict[str, str],
        uvicorn_args: Sequence[str] = (),
        app: str = SERVICE_APP,
    ) -> Iterator[ServiceProcess]:
        """`start`, wait until ready, and kill whatever is left of the process on the way out."""
        server = cls.start(log_path, settings, uvicorn_args, app)
        try:
            server.wait_until_ready()
            yield server
        finally:
            server.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self, timeout_s: float = 30.0) -> float:
        """Wait for `/health/ready` to answer 200; returns the seconds since the start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"uvicorn exited early:\n{self.log()[-4000:]}")
            if http_status(self.port, "/health/ready") == 200:
                return time.perf_counter() - self.started
            time.sleep(0.02)
        raise AssertionError(f"not ready after {timeout_s}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the service drains), then SIGKILL if it has not exited within `timeout_s`."""
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    # -- what the process uses, from /proc (Linux) -----------------------------------------------

    def _status_mib(self, name: str) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(name):
                return round(int(line.split()[1]) / 1024.0, 1)
        return 0.0

    def rss_mib(self) -> float:
        return self._status_mib("VmRSS:")

    def reset_peak_rss(self) -> None:
        """Start a new peak: the kernel's high-water mark (VmHWM) is reset to the current RSS."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def peak_rss_mib(self) -> float:
        return self._status_mib("VmHWM:")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
