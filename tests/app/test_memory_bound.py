"""The largest legal uploads at once keep a real server process under 1 GiB of peak RSS.

A 7000x7000 16-bit grey PNG is a few hundred KiB on the wire and 98 MB decoded; the 8-bit RGBA one
196 MB. Several at once used to multiply float64 copies past the container's memory limit; now
the decode budget admits them as memory allows and the stretch works in slices.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from cxr_testkit import build_onnx, metadata_for
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_six_huge_16_bit_pngs_and_two_rgba_ones_at_once_stay_under_1_gib(tmp_path) -> None:
    yy, xx = np.mgrid[0:7000, 0:7000]
    sixteen = _png(Image.fromarray(((xx + yy) % 4096).astype(np.uint16)))
    grey = ((xx * 3 + yy) % 256).astype(np.uint8)
    rgba = _png(Image.fromarray(np.stack([grey, grey, grey, grey], axis=-1), "RGBA"))
    del yy, xx, grey

    onnx_bytes = build_onnx()
    meta = metadata_for(onnx_bytes)
    (tmp_path / meta["onnx_file"]).write_bytes(onnx_bytes)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    env.update(
        CXR_MODEL_METADATA=str(tmp_path / "model.json"), CXR_PROVIDER="cpu", CXR_LOG_LEVEL="WARNING"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "never ready"
            time.sleep(0.05)

        def post(data: bytes) -> int:
            response = httpx.post(
                f"{base}/predict", content=data, headers={"content-type": "image/png"}, timeout=120
            )
            return response.status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, [sixteen] * 6 + [rgba] * 2))
        peak = _vm_kib(process.pid, "VmHWM:") * 1024
        assert statuses == [200] * 8
        assert peak < 1 * GiB, f"peak RSS {peak / 2**20:.0f} MiB"
        assert httpx.get(f"{base}/health/ready", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
