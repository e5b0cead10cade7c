"""glibc's allocation thresholds, as the service sets them: an upload-sized buffer is reused
without faulting its pages in again, and a full-size image's buffer leaves the process when freed.

Each case runs in a fresh interpreter: the thresholds are process-wide, and the test process's
own heap history would decide what the allocations reuse.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mallopt and /proc are glibc and Linux facts"
)

_PROBE = r"""
import json, resource, sys
import numpy as np
from app.ops.memory import return_large_blocks_to_the_os

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

if sys.argv[1] == "service":
    assert return_large_blocks_to_the_os()
else:  # the earlier setting: a fixed 1 MiB mmap threshold, which leaves trimming at 128 KiB
    import ctypes
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
out = {}
# The size of a 2500x2048 JPEG's half-scale decode; every page written, as a decoder does.
size = 1250 * 1024
buffer = np.empty(size, np.uint8); buffer.fill(1); del buffer
before = faults()
for _ in range(20):
    buffer = np.empty(size, np.uint8); buffer.fill(1); del buffer
out["faults_per_reuse"] = (faults() - before) / 20
# A full-size 16-bit image, 10 MB: after it is freed, RSS is back where it was.
start = rss_kib()
big = np.empty(2500 * 2048 * 2, np.uint8); big.fill(1)
out["held_kib"] = rss_kib() - start
del big
out["kept_kib"] = rss_kib() - start
print(json.dumps(out))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    return json.loads(done.stdout)


def test_an_upload_sized_buffer_is_reused_warm_and_a_full_size_one_is_given_back() -> None:
    got = _probe("service")
    # 1.3 MB is 312 pages: a fresh mapping each time would fault every one of them in.
    assert got["faults_per_reuse"] < 30, got
    assert got["held_kib"] > 9_000, got  # the 10 MB buffer was resident while it lived
    assert got["kept_kib"] < 1_000, got  # and left with it


def test_the_probe_tells_the_earlier_setting_apart() -> None:
    # A fixed 1 MiB threshold mapped the 1.3 MB buffer afresh on every reuse.
    got = _probe("one_mib")
    assert got["faults_per_reuse"] > 250, got
    assert got["kept_kib"] < 1_000, got
