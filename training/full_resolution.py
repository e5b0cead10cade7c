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
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from app.contract import ModelMetadata, load_metadata
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
    args = p.parse_args(argv)

    images = [Path(r.path) for r in load_kaggle_directory(args.data_dir, args.split)][:: args.every]
    report = {
        "model": str(args.model),
        "split": args.split,
        "results": [],
    }
    for size in args.sizes:
        result = compare_at_size(args.model, images, size)
        print(json.dumps(result), flush=True)
        report["results"].append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
