"""Real peers for the PACS tests, started on loopback with their own temporary configuration:
Orthanc with its DICOMweb plugin (HTTP and DICOM ports) and a throwaway PostgreSQL cluster.

Tools missing: a failure when `CI` is set (CI installs them, see `.ci/run`), a skip elsewhere.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.testing.server import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
ORTHANC_AET = "ORTHANC"
START_TIMEOUT_S = 30.0


def require_tool(path_or_name: str | Path, package: str) -> str:
    """The tool's path, or a failure under CI / a skip elsewhere."""
    found = (
        str(path_or_name)
        if Path(path_or_name).is_absolute() and Path(path_or_name).exists()
        else shutil.which(str(path_or_name))
    )
    if found is None:
        message = f"{path_or_name} not installed (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout_s:.0f} s")


class Orthanc:
    """One Orthanc process over a storage directory that outlives restarts (`stop`/`start`)."""

    def __init__(self, workdir: Path, extra: dict[str, Any] | None = None) -> None:
        self.binary = require_tool("Orthanc", "orthanc")
        require_tool(DICOMWEB_PLUGIN, "orthanc-dicomweb")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = workdir / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "pacs-test",
                    "StorageDirectory": str(workdir / "storage"),
                    "IndexDirectory": str(workdir / "storage"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": ORTHANC_AET,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": True,
                    "DicomAlwaysAllowStore": True,
                    "HttpDescribeErrors": True,
                    "Plugins": [str(DICOMWEB_PLUGIN)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "StableAge": 1,
                    **(extra or {}),
                }
            ),
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited: {self.log.read_text(errors='replace')[-2000:]}"
                )
            try:
                return httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(ready, START_TIMEOUT_S, "Orthanc")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10.0)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/tags?simplify"))

    def find_instance(self, sop_instance_uid: str) -> list[str]:
        response = httpx.post(f"{self.url}/tools/lookup", content=sop_instance_uid, timeout=10.0)
        response.raise_for_status()
        return [item["ID"] for item in response.json() if item["Type"] == "Instance"]

    def file(self, orthanc_id: str) -> bytes:
        response = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30.0)
        response.raise_for_status()
        return response.content

    def clear(self) -> None:
        for patient in self.get("/patients"):
            httpx.delete(f"{self.url}/patients/{patient}", timeout=10.0).raise_for_status()


@contextmanager
def orthanc_server(
    workdir: Path, start: bool = True, extra: dict[str, Any] | None = None
) -> Iterator[Orthanc]:
    """Orthanc on loopback; `extra` adds configuration (peers, modalities) to the defaults."""
    server = Orthanc(workdir, extra)
    if start:
        server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a loopback port; yields its URL.

    The server refuses to run as root, so under root the cluster belongs to the `postgres` user
    (Debian's package creates it) and its tools run through `runuser`.
    """
    initdb = require_tool(PG_BIN / "initdb", "postgresql")
    pg_ctl = require_tool(PG_BIN / "pg_ctl", "postgresql")
    as_user: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="pacs-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs a `postgres` user for the test cluster")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = workdir / "data", free_port()
    try:
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "outbox", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {workdir} -c fsync=off"
        subprocess.run(
            [
                *as_user,
                pg_ctl,
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(workdir / "pg.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        yield f"postgresql://outbox@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(workdir, ignore_errors=True)
