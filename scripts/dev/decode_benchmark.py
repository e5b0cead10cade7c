"""Decode + preprocess time of one full-resolution X-ray, as JPEG and as DICOM in several transfer
syntaxes: what the service spends before the model runs.

    .venv/bin/python -m scripts.dev.decode_benchmark --repeats 20 --out runs/decode_benchmark.json

The image is a real test X-ray upscaled to 2500x2048 (a common DR detector size) when the data
set is found beside the repository, otherwise a synthetic one (the report says which). The DICOM
versions hold it as 12-bit values with a window, as a detector would store it. Each figure is the
median of `--repeats` runs of `Classifier.prepare` (format detection, header checks, decode,
rendering, resize to the model input) in this process, after one warm-up run.

Beside each, the longest the decode kept this process's other threads from running Python: a
second thread wakes every millisecond while `Classifier.prepare` runs in a worker, and the longest
gap between its wake-ups is reported. In the service that is how long the event loop, and with it
every other request, stands still while one upload decodes.

When the model's contract reduces large JPEG 2000 frames (`preprocessing.dicom_j2k_reduction`),
the JPEG 2000 uploads are also timed with the rule switched off (a copy of the metadata without
it), in the same run: the full-resolution decode the rule replaces.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.contract import load_metadata
from app.model.loading import load_classifier
from app.settings import Settings
from app.testing.dicom_files import make_dicom

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "chest_xray"
DICOM_SYNTAXES = (
    "explicit_le",
    "rle",
    "jpeg_lossless_sv1",
    "jpeg_extended",
    "jpeg_ls",
    "j2k_lossless",
    "j2k",
)


def source_image(data_dir: Path, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    candidates = sorted((data_dir / "test" / "PNEUMONIA").glob("*.jpeg"))
    if candidates:
        image = Image.open(candidates[0]).convert("L").resize(size, Image.Resampling.BICUBIC)
        return np.asarray(image), f"real test X-ray upscaled to {size[0]}x{size[1]}"
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    return noise, f"synthetic noise {size[0]}x{size[1]} (data set not found)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "decode_benchmark.json")
    args = parser.parse_args(argv)

    pixels, source = source_image(args.data_dir, (2048, 2500))
    twelve_bit = (pixels.astype(np.uint16) * 16 + 8).astype(np.uint16)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG", quality=92)
    uploads = {"JPEG (8-bit, quality 92)": jpeg.getvalue()}
    for syntax in DICOM_SYNTAXES:
        uploads[f"DICOM {syntax} (12-bit)"] = make_dicom(
            twelve_bit, syntax, window=(2048.0, 4096.0), bits_stored=12
        )

    load_at_start = os.getloadavg()
    settings = Settings(provider="cpu")
    classifier = load_classifier(settings)
    runs = [(name, data, classifier) for name, data in uploads.items()]
    metadata_path = settings.resolved_model_metadata()
    meta = load_metadata(metadata_path)
    with tempfile.TemporaryDirectory() as tmp:
        if meta.preprocessing.dicom_j2k_reduction is not None:
            full = meta.model_copy(
                update={"preprocessing": meta.preprocessing.model_copy(
                    update={"dicom_j2k_reduction": None})}
            )  # fmt: skip
            copy = Path(tmp) / metadata_path.name
            copy.write_text(full.model_dump_json(indent=2))
            (Path(tmp) / meta.onnx_file).symlink_to(metadata_path.parent / meta.onnx_file)
            unreduced = load_classifier(Settings(provider="cpu", model_metadata=copy))
            runs += [
                (f"{name}, full resolution (rule off)", data, unreduced)
                for name, data in uploads.items()
                if "j2k" in name
            ]
        rows = _time_all(runs, args.repeats)

    report = {
        "image": source,
        "repeats": args.repeats,
        # 1, 5 and 15 minute load averages: the machine may be shared
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = [
        "| upload | size | median decode + preprocess | longest stall of other threads |",
        "|---|---:|---:|---:|",
    ]
    table += [
        f"| {r['upload']} | {r['bytes'] / 1e6:.2f} MB | {r['median_ms']} ms | "
        f"{r['longest_stall_ms']} ms |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(
        f"load average (1, 5, 15 min): {load_at_start} at the start, {os.getloadavg()} at the end"
    )
    return 0


def _time_all(runs: list[tuple[str, bytes, Any]], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, data, classifier in runs:
        classifier.prepare(data)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            classifier.prepare(data)
            times.append((time.perf_counter() - started) * 1000.0)
        rows.append(
            {
                "upload": name,
                "bytes": len(data),
                "median_ms": round(statistics.median(times), 2),
                "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 2),
                "longest_stall_ms": round(_longest_stall_ms(partial(classifier.prepare, data)), 1),
            }
        )
        print(
            f"{name:56s} {len(data) / 1e6:6.2f} MB  median {rows[-1]['median_ms']:7.2f} ms  "
            f"longest stall {rows[-1]['longest_stall_ms']:6.1f} ms"
        )
    return rows


def _longest_stall_ms(decode: Callable[[], object], times: int = 3) -> float:
    """The longest gap, in ms, between the wake-ups of a thread that sleeps 1 ms at a time while
    `decode` runs `times` times in another thread: how long the decode held the interpreter lock
    at a stretch (plus about a millisecond of sleep)."""
    worker = threading.Thread(target=lambda: [decode() for _ in range(times)])
    longest, last = 0.0, time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return longest * 1000.0


if __name__ == "__main__":
    raise SystemExit(main())
