"""Debian's rsyslog as an audit collector on loopback: RFC 5424 over TCP into a file, one line a
message, for the audit-trail tests. Skips where rsyslogd is missing, fails instead where
CXR_REQUIRE_RSYSLOG=1 (CI)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
# RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
HEADER = re.compile(r"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def rsyslog_collector(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """rsyslogd on a free loopback port, writing what it receives to a file: (port, file)."""
    if not Path(RSYSLOGD).exists():
        if os.environ.get("CXR_REQUIRE_RSYSLOG") == "1":
            pytest.fail("rsyslogd is required here (CXR_REQUIRE_RSYSLOG=1) but not installed")
        pytest.skip("rsyslogd is not installed (Debian package rsyslog; .ci/run installs it)")
    port, out = free_port(), tmp_path / "audit.log"
    (tmp_path / "work").mkdir(parents=True)
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{tmp_path / "work"}" maxMessageSize="64k")\n'
        'module(load="imtcp")\n'
        f'input(type="imtcp" address="127.0.0.1" port="{port}")\n'
        f'*.* action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")\n'
    )
    process = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslogd.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                errors = process.stderr.read() if process.stderr else b""
                raise AssertionError(f"rsyslogd did not start: {errors!r}") from exc
            time.sleep(0.1)
    try:
        yield port, out
    finally:
        process.terminate()
        process.wait(10)


def received(out: Path, count: int, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"rsyslog wrote {len(lines)} of {count} messages")


def audit_messages(
    out: Path, count: int, timeout_s: float = 20.0
) -> list[tuple[int, str, ET.Element]]:
    """The first `count` messages rsyslog wrote: (PRI, MSGID, the audit XML's root element)."""
    parsed = []
    for line in received(out, count, timeout_s):
        match = HEADER.match(line)
        assert match, line
        pri, _, _, _, _, msgid, _, message = match.groups()
        parsed.append((int(pri), msgid, ET.fromstring(message.lstrip("\ufeff"))))
    return parsed
