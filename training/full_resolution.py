"""How far the contract's JPEG DCT scaling moves a model's answers on full-resolution uploads.

    python -m training.full_resolution --model models/pneumonia_cxr.json \
        --data-dir ../shared/data/chest_xray --sizes 2500x2048 2048x2500 3000x2400 \
        --out runs/full-resolution.json

The data set ships 224 px copies only, so full-resolution uploads are made from the test split:
each image is upscaled (bicubic) to each size and saved as a JPEG (quality 95), as a detector export
would be. Every file is then preprocessed twice by the training side of the contract, once as the
contract says (`jpeg_dct_scaling`) and once decoded at full size (the rule switched off), and both
go through the model. Reports, per size, the largest and typical |difference| of the calibrated
probability of the positive class and the labels that flip at the operating threshold.

    python -m training.full_resolution --model models/pneumonia_cxr.json \
        --data-dir ../shared/data/chest_xray --sizes 2500x2048 --every 8 \
        --dicom-j2k 2:2 4:1 --out runs/full-resolution-j2k.json

`--dicom-j2k MIN_RATIO:MAX_LEVEL ...` measures JPEG 2000 reduction rules (`dicom_j2k_reduction`)
instead: each upscaled image becomes a 12-bit DICOM (values x 16 + 8, a window over the full
range), JPEG 2000 lossless and lossy (compression ratio 10), and is read by the training side at
full resolution and at the level each rule gives.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from app.contract import Jpeg2000Reduction, ModelMetadata, load_metadata
from training.data import load_kaggle_directory
from training.preprocessing import load_image, scale


def upscaled_jpeg(source: Path, size: tuple[int, int], out: Path, quality: int = 95) -> Path:
    with Image.open(source) as image:
        image.convert("L").resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
    return out


def positive_probability(session, meta: ModelMetadata, pixels: list[np.ndarray]) -> np.ndarray:
    batch = scale(np.stack(pixels), meta.preprocessing)
    (logits,) = session.run([meta.output.name], {meta.input.name: batch})
    probabilities: np.ndarray = meta.calibrated_probabilities(logits)[:, meta.positive_index]
    return probabilities


def compare_at_size(
    meta_path: Path, images: Sequence[Path], size: tuple[int, int], batch_size: int = 32
) -> dict:
    """Contract (DCT-scaled) against full-size decoding for `images` upscaled to `size`."""
    import onnxruntime as ort

    meta = load_metadata(meta_path)
    full_size = meta.preprocessing.model_copy(update={"jpeg_dct_scaling": None})
    session = ort.InferenceSession(
        str(meta_path.parent / meta.onnx_file), providers=["CPUExecutionProvider"]
    )
    scaled_p, exact_p = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(images), batch_size):
            scaled, exact = [], []
            for source in images[start : start + batch_size]:
                path = upscaled_jpeg(source, size, Path(tmp) / "upload.jpg")
                scaled.append(load_image(path, meta.preprocessing))
                exact.append(load_image(path, full_size))
            scaled_p.append(positive_probability(session, meta, scaled))
            exact_p.append(positive_probability(session, meta, exact))
    p_scaled, p_exact = np.concatenate(scaled_p), np.concatenate(exact_p)
    difference = np.abs(p_scaled - p_exact)
    threshold = meta.decision.threshold
    worst = int(np.argmax(difference))
    return {
        "size": f"{size[0]}x{size[1]}",
        "n_images": len(images),
        "max_abs_diff": round(float(difference.max()), 5),
        "p99_abs_diff": round(float(np.percentile(difference, 99)), 5),
        "mean_abs_diff": round(float(difference.mean()), 6),
        "n_above_0.02": int((difference > 0.02).sum()),
        "labels_flipped": int(((p_scaled >= threshold) != (p_exact >= threshold)).sum()),
        "worst_image": Path(images[worst]).name,
    }


def compare_j2k_at_size(
    meta_path: Path,
    images: Sequence[Path],
    size: tuple[int, int],
    rules: Sequence[Jpeg2000Reduction],
    syntaxes: Sequence[str] = ("j2k_lossless", "j2k"),
) -> list[dict]:
    """Each JPEG 2000 reduction rule against full-resolution decoding, per syntax, for `images`
    upscaled to `size` and stored as 12-bit JPEG 2000 DICOM."""
    import onnxruntime as ort

    from app.testing.dicom_files import make_dicom

    meta = load_metadata(meta_path)
    full = meta.preprocessing.model_copy(update={"dicom_j2k_reduction": None})
    reduced = [meta.preprocessing.model_copy(update={"dicom_j2k_reduction": r}) for r in rules]
    session = ort.InferenceSession(
        str(meta_path.parent / meta.onnx_file), providers=["CPUExecutionProvider"]
    )
    pixels: dict[tuple[str, int], list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.dcm"
        for source in images:
            with Image.open(source) as image:
                grey = np.asarray(image.convert("L").resize(size, Image.Resampling.BICUBIC))
            twelve_bit = grey.astype(np.uint16) * 16 + 8
            for syntax in syntaxes:
                path.write_bytes(
                    make_dicom(twelve_bit, syntax, window=(2048.0, 4096.0), bits_stored=12)
                )
                for i, spec in enumerate([full, *reduced]):
                    pixels.setdefault((syntax, i), []).append(load_image(path, spec))
    threshold = meta.decision.threshold
    out = []
    for syntax in syntaxes:
        exact = positive_probability(session, meta, pixels[(syntax, 0)])
        for i, rule in enumerate(rules, start=1):
            p = positive_probability(session, meta, pixels[(syntax, i)])
            difference = np.abs(p - exact)
            out.append(
                {
                    "size": f"{size[0]}x{size[1]}",
                    "syntax": syntax,
                    "rule": rule.model_dump(),
                    "n_images": len(images),
                    "max_abs_diff": round(float(difference.max()), 5),
                    "p99_abs_diff": round(float(np.percentile(difference, 99)), 5),
                    "mean_abs_diff": round(float(difference.mean()), 6),
                    "n_above_0.02": int((difference > 0.02).sum()),
                    "labels_flipped": int(((p >= threshold) != (exact >= threshold)).sum()),
                    "worst_image": Path(images[int(np.argmax(difference))]).name,
                }
            )
    return out


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="metadata JSON of the model")
    p.add_argument("--data-dir", type=Path, required=True, help="Kaggle-style root")
    p.add_argument("--split", default="test")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(2500, 2048)])
    p.add_argument("--every", type=int, default=1, help="use every n-th image of the split")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--dicom-j2k",
        nargs="+",
        metavar="MIN_RATIO:MAX_LEVEL",
        help="measure these JPEG 2000 reduction rules on 12-bit JPEG 2000 DICOM instead",
    )
    args = p.parse_args(argv)

    images = [Path(r.path) for r in load_kaggle_directory(args.data_dir, args.split)][:: args.every]
    report = {
        "model": str(args.model),
        "split": args.split,
        "results": [],
    }
    rules = [
        Jpeg2000Reduction(min_ratio=int(a), max_level=int(b))  # type: ignore[arg-type]
        for a, b in (text.split(":") for text in args.dicom_j2k or [])
    ]
    for size in args.sizes:
        results = (
            compare_j2k_at_size(args.model, images, size, rules)
            if rules
            else [compare_at_size(args.model, images, size)]
        )
        for result in results:
            print(json.dumps(result), flush=True)
            report["results"].append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
