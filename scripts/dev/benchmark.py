"""Measure the service against what this machine can do with this model, in one command:

    .venv/bin/python -m scripts.dev.benchmark    # writes runs/benchmark.json and .md

1. The in-process limit: decode + preprocess + inference of full-resolution uploads with the
   service's own code and model, no HTTP: a sequential loop per batch size, and a pipeline with
   decode threads feeding batched inference. The best of them is the limit.
2. The real service: `uvicorn app.main:app` as a subprocess on 127.0.0.1 (time from process start
   to a 200 from /health/ready), then closed-loop load at each --concurrency for --seconds with
   full-resolution JPEG uploads, a burst of --burst simultaneous uploads, and a full-resolution
   12-bit DICOM at concurrency 1 and 8: requests/s, latency percentiles, statuses, server RSS and
   CPU, and the ratio service/limit.
3. With --compare-ref REF, the same HTTP load against the service as it was at git REF.

Uploads are real test X-rays upscaled to --size (the data set ships 224 px copies; detector images
are 2-3k px a side), saved as JPEG quality 95. The load generator (scripts/dev/loadgen.py) runs in
this process on the same machine, so the service shares the CPU with it; its CPU use is reported.
Loopback only; every phase is bounded in time or count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from app.testing.server import ServiceProcess, free_port, http_status
from scripts.dev import fuzz, loadgen

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_DATA = Path(os.environ.get("CXR_DATA_DIR", REPO_ROOT.parent / "shared/data/chest_xray"))
TICKS = os.sysconf("SC_CLK_TCK")

NAIVE_KERAS_NOTE = (
    "not measured: the repository ships the model as ONNX plus metadata only; no Keras weights "
    "(.keras/.h5/SavedModel) exist in it, so a Keras `model.predict` service with the same "
    "weights cannot be built without retraining, which would not be the same model"
)


# -- inputs ------------------------------------------------------------------------------------


def xray_sources(data_dir: Path, n: int) -> list[Path]:
    paths = sorted((data_dir / "test").glob("*/*.jpeg"))
    if not paths:
        raise SystemExit(f"no test X-rays under {data_dir}/test (set --data-dir or CXR_DATA_DIR)")
    return paths[:: max(1, len(paths) // n)][:n]


def full_resolution_jpegs(sources: list[Path], size: tuple[int, int]) -> list[bytes]:
    out = []
    for path in sources:
        image = Image.open(path).convert("L").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def full_resolution_dicom(source: Path, size: tuple[int, int]) -> bytes:
    """A 12-bit DX radiograph (explicit VR little endian) from an upscaled test X-ray."""
    from app.testing.dicom_files import make_dicom

    image = Image.open(source).convert("L").resize(size, Image.Resampling.BICUBIC)
    stored = (np.asarray(image).astype(np.uint16) * 16 + 8).astype(np.uint16)  # 0..4095
    return make_dicom(stored, "explicit_le", bits_stored=12)


def worst_case_uploads() -> list[tuple[str, bytes, str]]:
    """The uploads that cost the most memory to decode, each within the default limits (50
    megapixels, 32 MiB): (name, bytes, content type)."""
    from app.testing.dicom_files import make_dicom

    yy7, xx7 = np.mgrid[0:7000, 0:7000]
    sixteen = ((xx7 + yy7) % 4096).astype(np.uint16)
    grey = ((xx7 * 3 + yy7) % 256).astype(np.uint8)
    rgba = Image.fromarray(np.stack([grey, grey, grey, grey], axis=-1), "RGBA")
    wide = np.tile(np.arange(256, dtype=np.uint8), (1700, 29400 // 256 + 1))[:, :29400]
    yy, xx = np.mgrid[0:4000, 0:4000]

    def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    return [
        ("7000x7000 16-bit grey PNG", encoded(Image.fromarray(sixteen), "PNG"), "image/png"),
        ("7000x7000 RGBA PNG", encoded(rgba, "PNG"), "image/png"),
        ("29400x1700 CMYK JPEG", encoded(Image.fromarray(wide).convert("CMYK"), "JPEG"),
         "image/jpeg"),
        ("4000x4000 12-bit DICOM, uncompressed (32 MB)",
         make_dicom(((xx + yy) % 4096).astype(np.uint16), "explicit_le", bits_stored=12),
         "application/dicom"),
        ("7000x7000 12-bit DICOM, RLE",
         make_dicom(((xx7 // 7 + yy7 // 7) % 4096).astype(np.uint16), "rle", bits_stored=12),
         "application/dicom"),
    ]  # fmt: skip


# -- machine -----------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    import onnxruntime
    import PIL

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "pillow": PIL.__version__,
    }


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Wait (up to `max_wait_s`) until the 1-minute load average is below `threshold`."""
    deadline = time.monotonic() + max_wait_s
    while load_average() >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    return load_average()


# -- 1. the in-process limit -------------------------------------------------------------------


def in_process_limit(metadata: Path, uploads: list[bytes], seconds: float, cores: int) -> dict:
    """The best images/s of several ways to run the service's own decode and model in one
    process: sequential decode-then-batch loops and pipelines of decode threads feeding batched
    inference, each with ONNX Runtime on one thread and on one per core."""
    from app.model.loading import load_classifier
    from app.settings import Settings

    results: dict[str, float] = {}
    for ort_threads in sorted({1, cores}):
        classifier = load_classifier(
            Settings(  # type: ignore[call-arg]
                model_metadata=metadata,
                provider="cpu",
                ort_intra_op_threads=ort_threads,
                _env_file=None,
            )
        )
        ort_name = f"ORT {ort_threads} thread{'s' if ort_threads > 1 else ''}"
        for batch in (1, 16):
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                tensors = [
                    classifier.prepare(uploads[(done + i) % len(uploads)]).tensor
                    for i in range(batch)
                ]
                classifier.predict_batch(np.concatenate(tensors))
                done += batch
            name = f"sequential loop, batch {batch}, {ort_name}"
            results[name] = done / (time.perf_counter() - started)
        for threads in (cores, cores + 1):
            for batch in (4, 16):
                name = f"{threads} decode threads + batched inference, batch {batch}, {ort_name}"
                results[name] = _pipelined(classifier, uploads, seconds, threads, batch)
    best = max(results, key=results.__getitem__)
    return {
        "images_per_s": round(results[best], 1),
        "best": best,
        "all": {k: round(v, 1) for k, v in results.items()},
        "decode_ms_p50": _decode_ms(classifier, uploads),
        "inference_ms_batch1_p50": _inference_ms(classifier, uploads[0]),
        "j2k_decode_ms_p50": _j2k_decode_ms(classifier, uploads[0]),
    }


def _pipelined(classifier, uploads: list[bytes], seconds: float, threads: int, batch: int) -> float:
    """Decode threads keep a queue of prepared images full; this thread runs them in batches."""
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(
            pool.submit(classifier.prepare, uploads[i % len(uploads)]) for i in range(2 * batch)
        )
        submitted, done, started = 2 * batch, 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            tensors = [pending.popleft().result().tensor for _ in range(batch)]
            for _ in range(batch):
                pending.append(pool.submit(classifier.prepare, uploads[submitted % len(uploads)]))
                submitted += 1
            classifier.predict_batch(np.concatenate(tensors))
            done += batch
        elapsed = time.perf_counter() - started
        for future in pending:
            future.cancel()
    return done / elapsed


def _decode_ms(classifier, uploads: list[bytes]) -> float:
    times = []
    for data in uploads * 3:
        started = time.perf_counter()
        classifier.prepare(data)
        times.append((time.perf_counter() - started) * 1000.0)
    return round(float(np.median(times)), 2)


def _j2k_decode_ms(classifier, upload: bytes, repeats: int = 10) -> dict[str, float]:
    """Decode + preprocess of the first upload as 12-bit JPEG 2000 DICOM, lossy and lossless, by
    the served contract (its `dicom_j2k_reduction`, if any): median of `repeats` after a warm-up."""
    from app.testing.dicom_files import make_dicom

    with Image.open(io.BytesIO(upload)) as image:
        twelve_bit = np.asarray(image.convert("L")).astype(np.uint16) * 16 + 8
    out = {}
    for syntax in ("j2k", "j2k_lossless"):
        data = make_dicom(twelve_bit, syntax, window=(2048.0, 4096.0), bits_stored=12)
        classifier.prepare(data)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            classifier.prepare(data)
            times.append((time.perf_counter() - started) * 1000.0)
        out["lossy" if syntax == "j2k" else "lossless"] = round(float(np.median(times)), 1)
    return out


def _inference_ms(classifier, upload: bytes) -> float:
    tensor = classifier.prepare(upload).tensor
    times = []
    for _ in range(50):
        started = time.perf_counter()
        classifier.predict_batch(tensor)
        times.append((time.perf_counter() - started) * 1000.0)
    return round(float(np.median(times)), 2)


# -- 2. the service over HTTP ------------------------------------------------------------------


def start_server(root: Path, metadata: Path, env: dict[str, str]) -> ServiceProcess:
    """The service found in `root`, on CPU, without a drain window (stop at once when done)."""
    settings = {
        "CXR_MODEL_METADATA": str(metadata),
        "CXR_PROVIDER": "cpu",
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_DRAIN_SECONDS": "0",
        # The probes' own port (polled beside the main port's probes in the overload phases).
        "CXR_PROBE_PORT": str(free_port()),
        **env,
    }
    server = ServiceProcess.start(None, settings, root=root)
    server.probe_port = int(settings["CXR_PROBE_PORT"])  # type: ignore[attr-defined]
    return server


@contextmanager
def measured(server: ServiceProcess, into: dict):
    """Record server CPU cores used, this client's CPU cores used, peak server RSS and load."""
    server.reset_peak_rss()
    cpu0, client0 = server.cpu_seconds(), _client_cpu()
    started = time.perf_counter()
    yield
    wall = time.perf_counter() - started
    into.update(
        server_cpu_cores=round((server.cpu_seconds() - cpu0) / wall, 2),
        client_cpu_cores=round((_client_cpu() - client0) / wall, 2),
        server_rss_peak_mib=server.peak_rss_mib(),
        load_average_after=load_average(),
    )


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_http(
    root: Path,
    metadata: Path,
    jpeg_requests: list[bytes],
    dicom_requests: list[bytes] | None,
    concurrencies: list[int],
    seconds: float,
    burst_size: int,
    worst_case: list[bytes],
    env: dict[str, str],
    overload: list[int] = [],  # noqa: B006 - read only
    slow_senders: int = 0,
    normal_clients: tuple[int, ...] = (2, 4),
    overload_seconds: float | None = None,
) -> dict:
    server = start_server(root, metadata, env)
    report: dict = {}
    try:
        report["ready_s"] = round(server.wait_until_ready(120.0), 3)
        report["idle_rss_mib"] = round(server.rss_mib(), 1)
        phases: dict[str, dict] = {}
        for concurrency in concurrencies:
            phase: dict = {"load_average_before": load_average()}
            with measured(server, phase):
                result = asyncio.run(
                    loadgen.closed_loop(server.port, jpeg_requests, concurrency, seconds)
                )
            phases[f"jpeg c={concurrency}"] = {**result.summary(), **phase}
        if burst_size:
            phase = {"load_average_before": load_average()}
            with measured(server, phase):
                result = asyncio.run(loadgen.burst(server.port, jpeg_requests, burst_size))
                after = time.perf_counter()
                ready = http_status(server.port, "/health/ready")
            phase["ready_status_after"] = ready
            phase["ready_checked_ms_after_burst"] = round((time.perf_counter() - after) * 1000, 1)
            phases[f"jpeg burst {burst_size}"] = {**result.summary(), **phase}
        for concurrency in (1, 8) if dicom_requests else ():
            phase = {"load_average_before": load_average()}
            with measured(server, phase):
                result = asyncio.run(
                    loadgen.closed_loop(server.port, dicom_requests or [], concurrency, seconds)
                )
            phases[f"dicom c={concurrency}"] = {**result.summary(), **phase}
        if worst_case:
            # Everything expensive at once, with full-resolution JPEGs beside it.
            mix = [w for w, n in zip(worst_case, (6, 2, 1, 2, 1), strict=True) for _ in range(n)]
            mix += jpeg_requests
            phase = {"load_average_before": load_average(), "uploads": len(mix)}
            with measured(server, phase):
                result = asyncio.run(loadgen.burst(server.port, mix, len(mix)))
            phase["ready_status_after"] = http_status(server.port, "/health/ready")
            phases["worst-case memory mix"] = {**result.summary(), **phase}
        capacity = max(
            (r["ok_per_s"] for name, r in phases.items() if name.startswith("jpeg c=")), default=0.0
        )
        for connections in overload:
            phases[f"overload {connections} connections"] = overload_phase(
                server, jpeg_requests, connections, overload_seconds or seconds, capacity
            )
        for clients in normal_clients if slow_senders else ():
            plural = "s" if clients != 1 else ""
            phases[f"{slow_senders} slow senders, {clients} normal client{plural}"] = (
                slow_sender_phase(
                    server, jpeg_requests, slow_senders, overload_seconds or seconds, clients
                )
            )
        report["phases"] = phases
        report["capacity_ok_per_s"] = capacity
        report["metrics_status"] = http_status(server.port, "/metrics")
        report["server_rss_high_water_mib"] = max(p["server_rss_peak_mib"] for p in phases.values())
    finally:
        server.stop()
    return report


CAPACITY_CLIENTS = 8  # closed-loop clients of the capacity measured before each overload phase
ADJACENT_CAPACITY_S = 5.0


def overload_phase(
    server: ServiceProcess, requests: list[bytes], connections: int, seconds: float, capacity: float
) -> dict:
    """Closed-loop clients past the admission limit, each sending again as soon as it is answered
    (ignoring `Retry-After`), with both health probes polled from another process throughout."""
    phase: dict = {"load_average_before": load_average(), "connections": connections}
    # The machine's speed drifts with its neighbours: capacity is measured again just before.
    adjacent = asyncio.run(
        loadgen.closed_loop(server.port, requests, CAPACITY_CLIENTS, ADJACENT_CAPACITY_S)
    )
    phase["capacity_just_before"] = adjacent.summary()["ok_per_s"]
    probes = loadgen.ProbePoller(probe_targets(server), seconds + 1.0)
    with measured(server, phase):
        result = asyncio.run(loadgen.closed_loop(server.port, requests, connections, seconds))
    phase["probes"] = probes.result()
    phase["ready_status_after"] = http_status(server.port, "/health/ready")
    summary = result.summary()
    if capacity:
        summary["goodput_over_capacity"] = round(summary["ok_per_s"] / capacity, 3)
    if phase["capacity_just_before"]:
        summary["goodput_over_capacity_just_before"] = round(
            summary["ok_per_s"] / phase["capacity_just_before"], 3
        )
    return {**summary, **phase}


def slow_sender_phase(
    server: ServiceProcess, requests: list[bytes], slow: int, seconds: float, normal_clients: int
) -> dict:
    """`normal_clients` closed-loop clients alone for `seconds`, then the same clients beside
    `slow` connections trickling headers or bodies (32 MiB declared, a few bytes per second),
    reconnecting when cut off; the slow ones start first, and the normal clients are measured once
    the slow ones are all connected."""
    phase: dict = {
        "load_average_before": load_average(),
        "slow_connections": slow,
        "normal_clients": normal_clients,
    }
    alone = asyncio.run(loadgen.closed_loop(server.port, requests, normal_clients, seconds))
    phase["normal_alone"] = alone.summary()
    trickling = loadgen.SlowSenders(server.port, slow, seconds + 4.0, declared_length=32 * 2**20)
    time.sleep(2.0)  # let them connect
    probes = loadgen.ProbePoller(probe_targets(server), seconds)
    with measured(server, phase):
        normal = asyncio.run(
            loadgen.closed_loop(server.port, requests, normal_clients, seconds, warmup_s=0.0)
        )
    phase["probes"] = probes.result()
    phase["slow"] = trickling.result()
    phase["ready_status_after"] = http_status(server.port, "/health/ready")
    return {**normal.summary(), **phase}


def probe_targets(server: ServiceProcess) -> list[tuple[str, int, str]]:
    return loadgen.probe_targets(server.port, getattr(server, "probe_port", None))


def checkout(ref: str, into: Path) -> Path:
    """The service's files (app/, models/) as they are at git `ref`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", ref, "app", "models"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# -- report ------------------------------------------------------------------------------------


def fuzz_phase(metadata: Path, count: int, env: dict[str, str]) -> dict:
    """`count` fuzzed DICOM uploads (single and batch) to a fresh service of this checkout."""
    server = start_server(REPO_ROOT, metadata, env)
    try:
        server.wait_until_ready(120.0)
        result = fuzz.fuzz_over_http("127.0.0.1", server.port, count, seed=1)
        result["ready_after"] = http_status(server.port, "/health/ready", 10.0)
        result["server_log_unhandled_errors"] = server.log().count("unhandled error")
    finally:
        server.kill()
    return result


def markdown(report: dict) -> str:
    best = report["in_process_limit"]
    limit = best["images_per_s"]
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"ONNX Runtime {m['onnxruntime']}, Pillow {m['pillow']}, Python {m['python']}.",
        f"Uploads: {report['uploads']['description']}.",
        "",
        f"In-process limit (decode + preprocess + inference, no HTTP): **{limit} images/s** "
        f"({best['best']}); decode {best['decode_ms_p50']} ms, inference "
        f"{best['inference_ms_batch1_p50']} ms (batch 1).",
        "",
    ]
    if best.get("j2k_decode_ms_p50"):
        j2k = best["j2k_decode_ms_p50"]
        lines += [
            f"The first upload as 12-bit JPEG 2000 DICOM, decode + preprocess: {j2k['lossy']} ms "
            f"lossy, {j2k['lossless']} ms lossless (median of 10).",
            "",
        ]
    for name, service in report["services"].items():
        lines += [
            f"**{name}**: ready {service['ready_s']} s after process start; idle RSS "
            f"{service['idle_rss_mib']} MiB, peak {service['server_rss_high_water_mib']} MiB.",
            "",
            "| load | req/s (200) | service / limit | p50 ms | p95 ms | p99 ms | statuses | "
            "server RSS peak MiB | server / client CPU cores | load avg before |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for phase, r in service["phases"].items():
            lat = r["latency_ms"] or {}
            ratio = f"{r['ok_per_s'] / limit:.2f}" if phase.startswith("jpeg c") and limit else "-"
            statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
            lines.append(
                f"| {phase} | {r['ok_per_s']} | {ratio} | {lat.get('p50', '-')} | "
                f"{lat.get('p95', '-')} | {lat.get('p99', '-')} | {statuses} | "
                f"{r['server_rss_peak_mib']} | {r['server_cpu_cores']} / {r['client_cpu_cores']} | "
                f"{r['load_average_before']} |"
            )
        after = [
            f"{phase}: /health/ready answered {r['ready_status_after']} right after"
            for phase, r in service["phases"].items()
            if "ready_status_after" in r
        ]
        lines += ["; ".join(after) + "." if after else "", ""]
        lines += overload_markdown(service)
    if "worst_case_uploads" in report:
        heavy = ", ".join(
            f"{n} x {name} ({size // 1024} KiB)"
            for (name, size), n in zip(
                report["worst_case_uploads"].items(), (6, 2, 1, 2, 1), strict=True
            )
        )
        lines += [f"Worst-case memory mix, sent at once: {heavy}, and the JPEG uploads.", ""]
    lines.append(f"Keras `model.predict` service: {report['naive_keras_service']}.")
    return "\n".join(lines) + "\n"


def _probe_cell(probes: dict, path: str) -> str:
    probe = probes.get(path) or {}
    lat = probe.get("latency_ms") or {}
    bad = sum(v for k, v in probe.get("statuses", {}).items() if k != "200")
    return f"{lat.get('max', '-')} / {lat.get('p99', '-')}" + (f" ({bad} not 200)" if bad else "")


def overload_markdown(service: dict) -> list[str]:
    phases = {
        name: r for name, r in service["phases"].items() if "probes" in r and "connections" in r
    }
    lines = []
    if phases:
        lines += [
            f"Overload (closed loop, `Retry-After` ignored; capacity = the best `jpeg c=` phase, "
            f"{service.get('capacity_ok_per_s')} req/s; capacity just before = {CAPACITY_CLIENTS} "
            f"closed-loop clients for {ADJACENT_CAPACITY_S:g} s right before the phase):",
            "",
            "| connections | goodput (2xx/s) | / capacity | / capacity just before | "
            "admitted p99 ms | statuses | "
            "/health/live max / p99 ms | /health/ready max / p99 ms | probe port live | "
            "probe port ready | ready after | server / client CPU | load avg before |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in phases.values():
            statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
            lines.append(
                f"| {r['connections']} | {r['ok_per_s']} | {r.get('goodput_over_capacity', '-')} | "
                f"{r.get('goodput_over_capacity_just_before', '-')} "
                f"({r.get('capacity_just_before', '-')} req/s) | "
                f"{(r['latency_ms'] or {}).get('p99', '-')} | {statuses} | "
                f"{_probe_cell(r['probes'], '/health/live')} | "
                f"{_probe_cell(r['probes'], '/health/ready')} | "
                f"{_probe_cell(r['probes'], 'probe port /health/live')} | "
                f"{_probe_cell(r['probes'], 'probe port /health/ready')} | "
                f"{r['ready_status_after']} | "
                f"{r['server_cpu_cores']} / {r['client_cpu_cores']} | {r['load_average_before']} |"
            )
        lines.append("")
    for name, r in service["phases"].items():
        if "slow" in r:
            slow = r["slow"]
            lat = r["latency_ms"] or {}
            alone = r.get("normal_alone") or {}
            alone_lat = alone.get("latency_ms") or {}
            lines += [
                f"{name}: {r.get('normal_clients', 8)} normal clients got {r['ok_per_s']} req/s, "
                f"p50 {lat.get('p50', '-')} ms, p99 {lat.get('p99', '-')} ms, statuses "
                f"{r['statuses']} (alone, just before: {alone.get('ok_per_s', '-')} req/s, p50 "
                f"{alone_lat.get('p50', '-')} ms, p99 {alone_lat.get('p99', '-')} ms); probes "
                f"live {_probe_cell(r['probes'], '/health/live')} ms, ready "
                f"{_probe_cell(r['probes'], '/health/ready')} ms (max / p99; probe port "
                f"{_probe_cell(r['probes'], 'probe port /health/live')} and "
                f"{_probe_cell(r['probes'], 'probe port /health/ready')}). The slow ones: "
                f"{slow['connections_opened']} connections, answered {slow['answered']}, closed "
                f"without an answer {slow['closed_by_server']}, still open at the end "
                f"{slow['still_open_at_end']}, held {slow['held_s']} s, their process used "
                f"{slow.get('cpu_cores', '-')} CPU cores; ready after: "
                f"{r['ready_status_after']}.",
                "",
            ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "pneumonia_cxr.json")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--size", type=int, nargs=2, default=(2500, 2048), metavar=("W", "H"))
    p.add_argument("--images", type=int, default=16, help="distinct uploads to cycle through")
    p.add_argument("--seconds", type=float, default=10.0, help="per load phase")
    p.add_argument("--limit-seconds", type=float, default=3.0, help="per in-process config")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--burst", type=int, default=256)
    p.add_argument("--no-dicom", action="store_true")
    p.add_argument(
        "--overload",
        type=int,
        nargs="*",
        default=[96, 192, 256, 384],
        help="connections for the overload phases (2x, 4x, 5.3x and 8x the default limit of 48)",
    )
    p.add_argument("--slow-senders", type=int, default=300, help="0: skip that phase")
    p.add_argument(
        "--normal-clients",
        type=int,
        nargs="+",
        default=[2, 4],
        help="closed-loop clients measured alone and then beside the slow senders, one phase per "
        "count (2: about two thirds of this machine's capacity, 4: near it)",
    )
    p.add_argument(
        "--overload-seconds",
        type=float,
        help="per overload and slow-sender phase (default: --seconds)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the worst-case memory mix")
    p.add_argument("--compare-ref", help="also load the service as it is at this git ref")
    p.add_argument(
        "--service-env",
        nargs="*",
        default=[],
        metavar="CXR_NAME=VALUE",
        help="settings for the measured service (to compare batching or thread choices)",
    )
    p.add_argument("--skip-limit", action="store_true", help="reuse no limit: report 0")
    p.add_argument("--quiet-load", type=float, default=0.5,
                   help="wait for the 1-min load average to drop below this first")  # fmt: skip
    p.add_argument("--max-wait", type=float, default=0.0, help="seconds to wait for quiet")
    p.add_argument(
        "--fuzz", type=int, default=0, metavar="N",
        help="also send N fuzzed DICOM uploads (scripts/dev/fuzz.py) to a fresh service",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "benchmark.json")
    args = p.parse_args(argv)

    load_at_start = wait_for_quiet(args.quiet_load, args.max_wait)
    size = tuple(args.size)
    sources = xray_sources(args.data_dir, args.images)
    uploads = full_resolution_jpegs(sources, size)
    jpeg_requests = [loadgen.build_request("/predict", u, "image/jpeg") for u in uploads]
    dicom_requests = None
    if not args.no_dicom:
        dicom = full_resolution_dicom(sources[0], size)
        dicom_requests = [loadgen.build_request("/predict", dicom, "application/dicom")]
    cores = len(os.sched_getaffinity(0))

    report: dict = {
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "uploads": {
            "description": f"{len(uploads)} real test X-rays upscaled to {size[0]}x{size[1]}, "
            f"JPEG quality 95, {int(np.mean([len(u) for u in uploads]) / 1024)} KiB on average"
            + ("; one 12-bit DICOM of the same size, uncompressed" if dicom_requests else ""),
            "jpeg_bytes_mean": int(np.mean([len(u) for u in uploads])),
        },
        "in_process_limit": (
            {
                "images_per_s": 0,
                "best": "not measured",
                "decode_ms_p50": 0,
                "inference_ms_batch1_p50": 0,
            }
            if args.skip_limit
            else in_process_limit(args.model, uploads, args.limit_seconds, cores)
        ),
        "naive_keras_service": NAIVE_KERAS_NOTE,
        "services": {},
    }
    print(json.dumps(report["in_process_limit"], indent=2), flush=True)
    worst_case = []
    if not args.no_memory:
        heavy = worst_case_uploads()
        report["worst_case_uploads"] = {name: len(data) for name, data, _ in heavy}
        worst_case = [loadgen.build_request("/predict", d, media) for _, d, media in heavy]
    common = (jpeg_requests, dicom_requests, args.concurrency, args.seconds, args.burst, worst_case)
    env = dict(item.split("=", 1) for item in args.service_env)
    report["service_env"] = env
    report["services"]["this checkout"] = run_http(
        REPO_ROOT, args.model, *common, env=env, overload=args.overload,
        slow_senders=args.slow_senders, overload_seconds=args.overload_seconds,
        normal_clients=tuple(args.normal_clients),
    )  # fmt: skip
    if args.compare_ref:
        name = f"git {args.compare_ref}"
        with tempfile.TemporaryDirectory() as tmp:
            root = checkout(args.compare_ref, Path(tmp))
            model = root / "models" / args.model.name
            try:
                report["services"][name] = run_http(
                    root, model, *common, env={}, overload=args.overload,
                    slow_senders=args.slow_senders, overload_seconds=args.overload_seconds,
                    normal_clients=tuple(args.normal_clients),
                )  # fmt: skip
            except (SystemExit, Exception) as exc:  # an old revision may not run in this venv
                report["compare_failed"] = f"{name}: {str(exc)[-500:]}"
    limit = report["in_process_limit"]["images_per_s"]
    for service in report["services"].values():
        for phase, r in service["phases"].items():
            if phase.startswith("jpeg c") and limit:
                r["service_over_limit"] = round(r["ok_per_s"] / limit, 3)

    if args.fuzz:
        report["fuzz"] = fuzz_phase(args.model, args.fuzz, env)

    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    table = markdown(report)
    if "fuzz" in report:
        table += "\n" + fuzz.markdown(report["fuzz"]) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
