"""Measure the service as an operator sees it: start-up to ready, per-request latency on a
full-resolution JPEG, server memory, and the in-process inference limit for comparison.

    .venv/bin/python scripts/benchmark.py --requests 50 --out runs/benchmark.json
    .venv/bin/python scripts/benchmark.py --concurrency 1 2 4 8 --duration 30   # throughput

Starts `uvicorn app.main:app` as a subprocess on 127.0.0.1 (a free port), so the figures include
HTTP, upload, decode and preprocessing. The upload is a real test X-ray from the data directory
upscaled to --size (the data set ships only 224x224 copies); without the data a synthetic image is
used and the report says so. Only loopback traffic; bounded request count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "chest_xray"


def full_resolution_jpeg(data_dir: Path, size: tuple[int, int]) -> tuple[bytes, str]:
    candidates = sorted((data_dir / "test" / "PNEUMONIA").glob("*.jpeg"))
    if candidates:
        image = Image.open(candidates[0]).convert("L").resize(size, Image.Resampling.BICUBIC)
        source = f"real test X-ray upscaled to {size[0]}x{size[1]}"
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8))
        source = f"synthetic noise image {size[0]}x{size[1]} (data not found)"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue(), source


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    base: str, payload: bytes, concurrency: int, duration_s: float, pid: int
) -> dict[str, object]:
    """`concurrency` clients posting back to back for `duration_s`: requests per second, latency,
    and the server's CPU time per request (its capacity on N cores is about N / that)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = http.post("/predict", content=payload, headers={"Content-Type": "image/jpeg"})
                elapsed = (time.perf_counter() - t0) * 1000
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(elapsed)

    cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall_before
    cpu = cpu_seconds(pid) - cpu_before
    ok = len(latencies)
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 1),
        "statuses": statuses,
        "requests_per_s": round(ok / wall, 1),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p95": round(percentile(latencies, 95), 1),
            "p99": round(percentile(latencies, 99), 1),
        },
        "server_cpu_cores_busy": round(cpu / wall, 2),
        "server_cpu_ms_per_request": round(cpu / ok * 1000, 1) if ok else None,
    }


def in_process_limit(metadata: Path, repeats: int) -> dict[str, float]:
    """Model-only latency (no HTTP, no decode): the floor any server design can reach."""
    from app.inference import load_classifier
    from app.settings import Settings

    classifier = load_classifier(Settings(model_metadata=metadata, provider="cpu"))
    spec = classifier.metadata.preprocessing
    batch = np.full((1, spec.height, spec.width, spec.channels), 0.5, np.float32)
    classifier.predict_batch(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.predict_batch(batch)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(percentile(times, 95), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "pneumonia_cxr.json")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--size", type=int, nargs=2, default=(2500, 2048), metavar=("W", "H"))
    p.add_argument("--requests", type=int, default=30)
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        default=[],
        help="after the sequential run, a throughput run for each number of concurrent clients",
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per throughput run")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="server CXR_ORT_INTRA_OP_THREADS and CXR_DECODE_CONCURRENCY (as a CPU limit would)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    payload, source = full_resolution_jpeg(args.data_dir, tuple(args.size))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_MODEL_METADATA=str(args.model),
        CXR_PROVIDER="cpu",
        CXR_LOG_LEVEL="WARNING",
        CXR_ORT_INTRA_OP_THREADS=str(args.threads),
        CXR_DECODE_CONCURRENCY=str(args.threads),
        CXR_DRAIN_SECONDS="0",
    )
    started = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not become ready within 120 s")
                time.sleep(0.05)
            startup_s = time.perf_counter() - started
            latencies, decode, inference = [], [], []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                r = client.post("/predict", content=payload, headers={"Content-Type": "image/jpeg"})
                latencies.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                decode.append(r.json()["timing_ms"]["decode"])
                inference.append(r.json()["timing_ms"]["inference"])
            rss = rss_mib(server.pid)
        loads = [throughput(base, payload, n, args.duration, server.pid) for n in args.concurrency]
    finally:
        server.terminate()
        server.wait(timeout=30)

    report = {
        "machine": f"{os.cpu_count()} CPU cores",
        "upload": {"source": source, "bytes": len(payload)},
        "startup_to_ready_s": round(startup_s, 2),
        "requests": args.requests,
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p95": round(percentile(latencies, 95), 1),
            "max": round(max(latencies), 1),
        },
        "server_decode_ms_p50": round(statistics.median(decode), 1),
        "server_inference_ms_p50": round(statistics.median(inference), 1),
        "server_rss_mib_after": round(rss, 1) if rss else None,
        "throughput": loads,
        "in_process_model_only_ms": in_process_limit(args.model, max(args.requests, 20)),
        "onnx_file_bytes": (args.model.parent / json.loads(args.model.read_text())["onnx_file"])
        .stat()
        .st_size,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
