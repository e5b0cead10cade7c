"""Evaluate any exported ONNX model (with its metadata JSON) on a directory of labelled images.

    python -m training.evaluate --model models/pneumonia_cxr.json \
        --data-dir ../shared/data/chest_xray --split test --out runs/shipped/test

`--data-dir` is either a Kaggle-style root (give `--split`) or a directory with one sub-directory
per class. The model's own preprocessing contract, temperature and threshold (from its metadata)
are applied; nothing is tuned here. Writes a JSON report, a classification report, per-image
predictions (CSV) and plots. `--record` also stores the figures in the metadata JSON under
`metrics.<split>`: do that once, for the final test evaluation.

Needs ONNX Runtime, NumPy, Pillow and matplotlib; not TensorFlow.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from app.contract import ModelMetadata, load_metadata
from training import plots
from training.data import CLASSES, Record, load_kaggle_directory, patient_from_filename
from training.dataset import load_images
from training.metrics import evaluate_scores, format_summary
from training.preprocessing import scale


def records_for(data_dir: Path, split: str | None) -> list[Record]:
    if split:
        return load_kaggle_directory(data_dir, split)
    records = []
    for label, class_name in enumerate(CLASSES):
        for path in sorted((data_dir / class_name).glob("*")):
            if path.suffix.lower() in {".jpeg", ".jpg", ".png", ".dcm"}:
                records.append(
                    Record(str(path), label, f"{class_name}/{patient_from_filename(path.name)}")
                )
    if not records:
        raise FileNotFoundError(f"no images under {data_dir}/<{'|'.join(CLASSES)}>/")
    return records


def predict_logits(
    meta: ModelMetadata, onnx_path: Path, images: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(images), batch_size):
        batch = scale(images[i : i + batch_size], meta.preprocessing)
        out.append(session.run([meta.output.name], {meta.input.name: batch})[0])
    return np.concatenate(out)


def classification_report(metrics: dict, classes: list[str], positive_class: str) -> str:
    """Per-class precision, recall and F1 of a two-class decision, from its confusion matrix."""
    cm = metrics["confusion_matrix"]
    (negative_class,) = [c for c in classes if c != positive_class]
    # (true positives, false positives, false negatives) with each class taken as the positive one
    per_class = {
        negative_class: (cm["tn"], cm["fn"], cm["fp"]),
        positive_class: (cm["tp"], cm["fp"], cm["fn"]),
    }
    rows = [f"{'':<12}{'precision':>10}{'recall':>10}{'f1':>8}{'support':>9}"]
    for name in classes:
        tp, fp, fn = per_class[name]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(f"{name:<12}{precision:>10.4f}{recall:>10.4f}{f1:>8.4f}{tp + fn:>9}")
    return "\n".join(rows)


def evaluate(meta_path: Path, data_dir: Path, split: str | None, out: Path, seed: int = 0) -> dict:
    meta = load_metadata(meta_path)
    onnx_path = meta_path.parent / meta.onnx_file
    records = records_for(data_dir, split)
    start = time.monotonic()
    images = load_images(records, meta.preprocessing, progress_every=200)
    logits = predict_logits(meta, onnx_path, images)
    seconds = time.monotonic() - start
    if len(meta.classes) != 2 or set(meta.classes) != set(CLASSES):
        raise ValueError(f"{meta.name} has classes {meta.classes}; the data has {list(CLASSES)}")
    # the contract's own calibration and decision rule, exactly as the service applies them
    probs = meta.calibrated_probabilities(logits)
    scores = probs[:, meta.positive_index]
    labels = np.array([r.class_name == meta.decision.positive_class for r in records], dtype=int)
    metrics = evaluate_scores(
        labels, scores, meta.decision.threshold, [r.patient_id for r in records], seed=seed
    )
    name = split or data_dir.name
    report = {
        "model": {"name": meta.name, "version": meta.version, "sha256": meta.sha256},
        "data": {"dir": str(data_dir), "split": split, "n_images": len(records)},
        "seconds": round(seconds, 1),
        "metrics": metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report_text = classification_report(metrics, meta.classes, meta.decision.positive_class)
    (out / "classification_report.txt").write_text(report_text + "\n")
    with (out / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", *(f"p_{c}" for c in meta.classes), "predicted"])
        for r, p in zip(records, probs, strict=True):
            predicted = meta.label_at_operating_point(p)
            writer.writerow([Path(r.path).name, r.class_name, *(f"{v:.6f}" for v in p), predicted])
    plots.roc(
        labels,
        scores,
        meta.decision.threshold,
        out / "roc.png",
        title=f"ROC, {name} ({len(records)} images)",
    )
    confusion = metrics["confusion_matrix"]
    assert isinstance(confusion, dict)
    plots.confusion_matrix(
        confusion,
        out / "confusion_matrix.png",
        title=f"{name} at threshold {meta.decision.threshold:.3f}",
    )
    plots.sample_grid(images, labels, out / "sample_grid.png", seed=seed, scores=scores)
    print(
        f"[evaluate] {meta.name} {meta.version} on {name}: "
        f"{len(records)} images in {seconds:.1f} s\n"
        f"{format_summary(metrics)}\n\n{report_text}",
        flush=True,
    )
    return report


def record_in_metadata(meta_path: Path, split: str, metrics: dict) -> None:
    """Store `metrics` under `metrics.<split>` in the metadata JSON (the ONNX file is untouched)."""
    raw = json.loads(meta_path.read_text())
    raw.setdefault("metrics", {})[split] = metrics
    ModelMetadata.model_validate(raw)
    meta_path.write_text(json.dumps(raw, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="metadata JSON beside the ONNX file")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--split", help="sub-directory of a Kaggle-style root, e.g. test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record", action="store_true", help="write the figures into the metadata JSON")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    report = evaluate(args.model, args.data_dir, args.split, args.out, args.seed)
    if args.record:
        record_in_metadata(args.model, args.split or args.data_dir.name, report["metrics"])
        print(f"[evaluate] recorded metrics.{args.split or args.data_dir.name} in {args.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
