"""Export a trained run to ONNX plus metadata JSON, gated on a Keras-vs-ONNX Runtime parity check.

    python -m training.export --run runs/shipped --out-dir models --name pneumonia_cxr

The parity batch is a fixed set of real validation images (the first `--parity-images` of the
run's split manifest). The export fails, and nothing is written to `--out-dir`, unless the largest
absolute difference between Keras and ONNX Runtime logits is within `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from app.contract import SCHEMA_VERSION, ModelMetadata, Preprocessing, dump_metadata
from training.cam import attach_cam_output
from training.data import CLASSES, POSITIVE_CLASS, file_sha256, read_split
from training.dataset import load_images
from training.intended_use import PAEDIATRIC_CHEST_XRAY
from training.monitoring import reference_block
from training.preprocessing import scale

# What of a run's summary.json the metadata keeps under provenance.training.
TRAINING_RECORD_KEYS = (
    "epochs_run",
    "best_epoch",
    "training_seconds",
    "hardware",
    "seed",
    "hyperparameters",
    "augmentation",
    "class_weights",
)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_TOLERANCE = 1e-4  # on logits; float32 reorderings between TF and ORT stay around 1e-5


class ParityError(RuntimeError):
    """Keras and ONNX Runtime disagree beyond the tolerance: the ONNX file is not shipped."""


def convert_to_onnx(
    model, path: Path, height: int, width: int, channels: int, opset: int = 17
) -> None:
    """Keras 3 -> ONNX through tf2onnx, with a named input/output and a dynamic batch dimension."""
    import keras
    import onnx

    spec = keras.InputSpec(shape=(None, height, width, channels), dtype="float32", name=INPUT_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        model.export(
            str(raw), format="onnx", input_signature=[spec], opset_version=opset, verbose=False
        )
        graph = onnx.load(str(raw))
    # tf2onnx names the output after the TF function's return; give it the contract's name.
    old = graph.graph.output[0].name
    for node in graph.graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
    graph.graph.output[0].name = OUTPUT_NAME
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.graph.doc_string = (
        "Chest X-ray NORMAL/PNEUMONIA classifier; logits, see the metadata JSON."
    )
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def parity_check(model, onnx_path: Path, batch: np.ndarray, tolerance: float) -> dict[str, float]:
    import onnxruntime as ort

    keras_logits = np.asarray(model.predict(batch, verbose=0))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    # also with batch size 1, to prove the batch dimension is really dynamic
    single = session.run([OUTPUT_NAME], {INPUT_NAME: batch[:1]})[0]
    diff = float(np.max(np.abs(keras_logits - ort_logits)))
    diff_single = float(np.max(np.abs(keras_logits[:1] - single)))
    result = {
        "max_abs_diff_logits": diff,
        "max_abs_diff_batch1": diff_single,
        "tolerance": tolerance,
        "n_images": len(batch),
    }
    if not (diff <= tolerance and diff_single <= tolerance):
        raise ParityError(
            f"Keras vs ONNX Runtime logits differ by {max(diff, diff_single):.3g} > {tolerance:g}"
        )
    return result


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "pillow"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def data_provenance(data: dict) -> dict:
    """The run's data record plus the sha256 of the data set's own manifest.csv, when it has one."""
    manifest = Path(str(data.get("source", ""))) / "manifest.csv"
    if manifest.is_file():
        return {**data, "manifest_sha256": file_sha256(manifest)}
    return dict(data)


def build_metadata(
    name: str,
    version: str,
    onnx_file: Path,
    summary: dict,
    parity: dict,
    spec: Preprocessing,
    cam: tuple[dict, dict] | None = None,
) -> dict:
    metrics = {"validation": summary["validation_metrics"]}
    if "holdout_metrics" in summary:
        metrics["holdout"] = summary["holdout_metrics"]
    meta = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "onnx_file": onnx_file.name,
        "sha256": file_sha256(onnx_file),
        "classes": list(CLASSES),
        "input": {
            "name": INPUT_NAME,
            "shape": [None, spec.height, spec.width, spec.channels],
            "dtype": "float32",
            "layout": "NHWC",
        },
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "shape": [None, len(CLASSES)],
                "dtype": "float32",
                "role": "classifier",
                "kind": "logits",
            },
            *([cam[0]] if cam else []),
        ],
        "preprocessing": spec.model_dump(),
        "decision": {**summary["decision"], "positive_class": POSITIVE_CLASS},
        "calibration": summary["calibration"],
        "intended_use": PAEDIATRIC_CHEST_XRAY.model_dump(),
        **({"cam": cam[1]} if cam else {}),
        "metrics": metrics,
        "provenance": {
            "architecture": summary["architecture"],
            "parameters": summary["parameters"],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "training": {k: summary[k] for k in TRAINING_RECORD_KEYS},
            "data": data_provenance(summary["data"]),
            "parity": parity,
            "library_versions": library_versions(),
            "onnx_size_bytes": onnx_file.stat().st_size,
        },
    }
    ModelMetadata.model_validate(meta)  # never write a file the service would refuse
    return meta


def export_run(
    run: Path, out_dir: Path, name: str, version: str, tolerance: float, parity_images: int
) -> Path:
    import keras

    import training.models  # noqa: F401  (registers the custom layers for loading)

    summary = json.loads((run / "summary.json").read_text())
    spec = Preprocessing.model_validate(summary["preprocessing"])
    model = keras.models.load_model(run / "best.keras", compile=False)
    val_records = read_split(run / "split.csv")["val"][:parity_images]
    batch = scale(load_images(val_records, spec), spec)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        staged = Path(tmp) / f"{name}.onnx"
        start = time.monotonic()
        convert_to_onnx(model, staged, spec.height, spec.width, spec.channels)
        print(
            f"[export] converted in {time.monotonic() - start:.1f} s "
            f"({staged.stat().st_size / 1e6:.2f} MB)",
            flush=True,
        )
        parity = parity_check(model, staged, batch, tolerance)
        print(
            f"[export] parity on {parity['n_images']} validation images: max |logit diff| "
            f"{parity['max_abs_diff_logits']:.2e} <= {tolerance:g}",
            flush=True,
        )
        cam = attach_cam_output(staged, OUTPUT_NAME)
        final = out_dir / f"{name}.onnx"
        shutil.move(str(staged), final)
    meta = build_metadata(name, version, final, summary, parity, spec, cam)
    # The drift reference: the calibrated P(positive) distribution on the whole validation split.
    val_all = read_split(run / "split.csv")["val"]
    meta["monitoring"] = reference_block(final, ModelMetadata.model_validate(meta), val_all)
    ModelMetadata.model_validate(meta)
    meta_path = out_dir / f"{name}.json"
    meta_path.write_text(dump_metadata(meta))
    shutil.copyfile(run / "split.csv", out_dir / f"{name}.split.csv")
    print(f"[export] wrote {final} and {meta_path}", flush=True)
    return meta_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run", type=Path, required=True, help="run directory written by training.train"
    )
    p.add_argument("--out-dir", type=Path, default=Path("models"))
    p.add_argument("--name", default="pneumonia_cxr")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument("--parity-images", type=int, default=32)
    args = p.parse_args(argv)
    try:
        export_run(
            args.run, args.out_dir, args.name, args.version, args.tolerance, args.parity_images
        )
    except ParityError as exc:
        print(f"[export] REFUSED: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
