"""`pneumonia-predict`: the shipped model's answers for files and folders of X-rays, offline.

    pneumonia-predict ../shared/data/chest_xray/test -o answers.csv
    pneumonia-predict a.jpeg b.png study/ --format jsonl

Each image goes through the service's own prediction step (`app.serving.prediction`: the same
decode, intended-use gating, preprocessing, batching and calibration as `POST /predict`), under
the same `CXR_*` settings (model path, site profile, provider, limits), so a file's row carries
the probabilities the service would answer for its bytes. Folders are walked recursively for
JPEG, PNG and DICOM files (by extension; DICOM files without one are found by their preamble).
A file the service would refuse gets a row with the error code and message and the run goes on;
the exit status is 1 when any file failed, 0 otherwise. Progress goes to stderr, rows to the
output (stdout by default). No server is started and no port is opened.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.errors import ModelLoadError, PayloadTooLarge, ServiceError
from app.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm", ".dicom"}
_DICOM_PREAMBLE = 128  # bytes before "DICM" in a Part 10 file


@dataclass(frozen=True)
class Row:
    """One file's outcome: its answer, or why the service would refuse it."""

    path: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    threshold: float | None = None
    warnings: tuple[str, ...] = ()
    error_code: str | None = None
    error: str | None = None

    def as_dict(self, classes: list[str]) -> dict[str, Any]:
        probabilities = self.probabilities or {}
        return {
            "path": self.path,
            "label": self.label,
            **{f"p_{name}": probabilities.get(name) for name in classes},
            "threshold": self.threshold,
            "warnings": list(self.warnings),
            "error_code": self.error_code,
            "error": self.error,
        }


def _is_dicom_without_suffix(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(_DICOM_PREAMBLE + 4)
    except OSError:
        return False
    return head[_DICOM_PREAMBLE:] == b"DICM"


def image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """The files named, and the image files under the folders named, in a stable order."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                suffix = child.suffix.lower()
                if suffix in IMAGE_SUFFIXES or (not suffix and _is_dicom_without_suffix(child)):
                    yield child
        else:
            yield path  # named explicitly: read it whatever its name, or report why not


class Progress:
    """A one-line counter on stderr: redrawn in place on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total, self.stream, self.done, self.failed = total, stream, 0, 0
        self.started = time.monotonic()
        self.tty = stream.isatty()
        self._next_line = 0

    def step(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.tty or self.done >= self._next_line or self.done == self.total:
            elapsed = time.monotonic() - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            text = (
                f"[predict] {self.done}/{self.total} images, {self.failed} refused, "
                f"{rate:.1f} images/s"
            )
            self.stream.write(("\r" + text) if self.tty else text + "\n")
            self.stream.flush()
            self._next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def predict_files(
    files: list[Path], settings: Settings, progress: Progress | None = None
) -> tuple[list[Row], list[str]]:
    """Every file's row, in the order given, and the model's class names."""
    from app.model.loading import load_classifier
    from app.ops.metrics import ServiceMetrics
    from app.serving.prediction import start_prediction

    classifier = load_classifier(settings)
    step = start_prediction(classifier, settings, ServiceMetrics())
    # Enough images in flight to fill every decode thread and a model batch, no more: the
    # files are read only when their turn comes, so memory stays bounded by this, not the folder.
    slots = asyncio.Semaphore(2 * settings.decode_slots + settings.max_batch_size)

    async def one(path: Path) -> Row:
        async with slots:
            try:
                data = path.read_bytes()
                if len(data) > settings.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"the file is {len(data)} bytes; the limit is "
                        f"{settings.max_upload_bytes} (CXR_MAX_UPLOAD_BYTES)"
                    )
                prediction = await step.predict(data)
            except ServiceError as exc:
                row = Row(str(path), error_code=exc.code, error=exc.message)
            except OSError as exc:
                row = Row(str(path), error_code="unreadable_file", error=exc.strerror or str(exc))
            else:
                row = Row(
                    str(path),
                    label=prediction.label,
                    probabilities=prediction.probabilities,
                    threshold=classifier.threshold,
                    warnings=tuple(prediction.warnings),
                )
        if progress is not None:
            progress.step(row.error_code is not None)
        return row

    try:
        rows = await asyncio.gather(*(one(path) for path in files))
    finally:
        await step.aclose()
    return list(rows), list(classifier.metadata.classes)


def write_rows(rows: list[Row], classes: list[str], fmt: str, out: IO[str]) -> None:
    records = [row.as_dict(classes) for row in rows]
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record) + "\n")
        return
    fields = ["path", "label", *(f"p_{c}" for c in classes), "threshold", "warnings"]
    writer = csv.DictWriter(out, fieldnames=[*fields, "error_code", "error"])
    writer.writeheader()
    for record in records:
        # repr-exact floats, so that a CSV round trip gives the answer's numbers bit for bit
        writer.writerow(
            {
                **{k: (repr(v) if isinstance(v, float) else v) for k, v in record.items()},
                "warnings": "; ".join(record["warnings"]),
            }
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pneumonia-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", type=Path, nargs="+", help="image files and folders")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("-o", "--output", type=Path, help="where to write the rows (default: stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)

    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        p.error(f"no such file or folder: {', '.join(missing)}")
    files = list(image_files(args.paths))
    if not files:
        p.error("no JPEG, PNG or DICOM files under the paths given")
    progress = None if args.quiet else Progress(len(files), sys.stderr)
    try:
        rows, classes = asyncio.run(predict_files(files, Settings(), progress))
    except ModelLoadError as exc:
        print(f"[predict] the model cannot be loaded: {exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    if args.output is not None:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            write_rows(rows, classes, args.format, out)
    else:
        write_rows(rows, classes, args.format, sys.stdout)
    failed = sum(row.error_code is not None for row in rows)
    if failed:
        print(f"[predict] {failed} of {len(rows)} files were refused", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
