"""What a model costs the service, beside another model, in one run on this machine:

    .venv/bin/python -m scripts.dev.model_cost --model models/pneumonia_cxr.json \\
        --against models/1.0.0/pneumonia_cxr.json            # writes runs/model_cost.json

For each model, in alternating rounds (this machine's speed drifts by 30-50% over minutes, so the
two are measured side by side, never one after the other):

1. the in-process limit on full-resolution JPEG uploads (`benchmark.in_process_limit`: the best of
   the sequential and pipelined ways of running the service's decode and model in one process);
2. the real service (`uvicorn` subprocess on 127.0.0.1) at concurrency 1: p50 latency of the same
   JPEG uploads and of the same X-rays as 12-bit lossless JPEG 2000 DICOM, in one service run.

The issue's limits: the new model's in-process limit at least 0.75x the old one's, and the
lossless JPEG 2000 p50 at most 4x the JPEG p50 of the same run. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.dev import benchmark, loadgen

REPO_ROOT = Path(__file__).resolve().parents[2]


def lossless_j2k_dicoms(sources: list[Path], size: tuple[int, int]) -> list[bytes]:
    from app.testing.dicom_files import make_dicom

    out = []
    for path in sources:
        grey = np.asarray(Image.open(path).convert("L").resize(size, Image.Resampling.BICUBIC))
        stored = grey.astype(np.uint16) * 16 + 8  # 12-bit, 8..4088
        out.append(make_dicom(stored, "j2k_lossless", window=(2048.0, 4096.0), bits_stored=12))
    return out


def service_p50(metadata: Path, jpegs: list[bytes], dicoms: list[bytes], seconds: float) -> dict:
    server = benchmark.start_server(REPO_ROOT, metadata, {})
    try:
        server.wait_until_ready(120.0)
        out = {}
        for name, uploads, media in (
            ("jpeg", jpegs, "image/jpeg"),
            ("j2k_lossless_dicom", dicoms, "application/dicom"),
        ):
            requests = [loadgen.build_request("/predict", u, media) for u in uploads]
            result = asyncio.run(loadgen.closed_loop(server.port, requests, 1, seconds)).summary()
            out[name] = {
                "p50_ms": result["latency_ms"]["p50"],
                "ok": result["ok"],
                "statuses": result["statuses"],
            }
        out["j2k_over_jpeg_p50"] = round(
            out["j2k_lossless_dicom"]["p50_ms"] / out["jpeg"]["p50_ms"], 2
        )
        return out
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="metadata JSON of the new model")
    p.add_argument("--against", type=Path, required=True, help="metadata JSON of the old model")
    p.add_argument("--data-dir", type=Path, default=benchmark.DEFAULT_DATA)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit-seconds", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=10.0, help="per service phase")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "model_cost.json")
    args = p.parse_args(argv)

    size = (2500, 2048)
    sources = benchmark.xray_sources(args.data_dir, args.images)
    jpegs = benchmark.full_resolution_jpegs(sources, size)
    dicoms = lossless_j2k_dicoms(sources, size)
    cores = len(os.sched_getaffinity(0))
    models = {"new": args.model, "old": args.against}
    rounds: list[dict] = []
    for i in range(args.rounds):
        order = ("new", "old") if i % 2 == 0 else ("old", "new")
        measured: dict = {"order": order, "load_average_before": benchmark.load_average()}
        for name in order:
            limit = benchmark.in_process_limit(models[name], jpegs, args.limit_seconds, cores)
            measured[name] = {
                "in_process_images_per_s": limit["images_per_s"],
                "inference_ms_batch1_p50": limit["inference_ms_batch1_p50"],
                "decode_ms_p50": limit["decode_ms_p50"],
                "service": service_p50(models[name], jpegs, dicoms, args.seconds),
            }
            print(json.dumps({name: measured[name]}), flush=True)
        measured["limit_new_over_old"] = round(
            measured["new"]["in_process_images_per_s"] / measured["old"]["in_process_images_per_s"],
            3,
        )
        rounds.append(measured)
    report = {
        "machine": benchmark.machine(),
        "uploads": f"{len(jpegs)} test X-rays at {size[0]}x{size[1]}: JPEG quality 95, and 12-bit "
        "lossless JPEG 2000 DICOM",
        "models": {k: str(v) for k, v in models.items()},
        "rounds": rounds,
        "limit_new_over_old_median": statistics.median(r["limit_new_over_old"] for r in rounds),
        "j2k_over_jpeg_p50_new_median": statistics.median(
            r["new"]["service"]["j2k_over_jpeg_p50"] for r in rounds
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in list(report)[-2:]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
