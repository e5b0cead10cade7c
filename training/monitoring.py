"""The drift-monitoring reference of an exported model: the distribution of its calibrated
probability of the positive class on the validation split, stored in the model contract as
`monitoring.reference` (`app.contract.ProbabilityReference`). The service scores its recent answers
against it (`cxr_drift_psi`).

`training.export` writes it for every export. For a model exported before, add it in place:

    python -m training.monitoring --model models/pneumonia_cxr.json \
        --split models/pneumonia_cxr.split.csv

The images are read and scaled by training's own preprocessing (`training.dataset`, proven equal
to serving's by the parity tests) and run through the exported ONNX file with ONNX Runtime on CPU;
the contract's calibration turns the logits into probabilities. The ONNX file is not changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.contract import ModelMetadata, ProbabilityReference, dump_metadata
from training.data import Record, read_split
from training.dataset import load_images
from training.preprocessing import scale

BATCH = 32


def validation_probabilities(
    onnx_path: Path, meta: ModelMetadata, records: list[Record]
) -> np.ndarray:
    """The calibrated P(positive) of each record, through the ONNX file (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pixels = load_images(records, meta.preprocessing)
    out = []
    for start in range(0, len(records), BATCH):
        batch = scale(pixels[start : start + BATCH], meta.preprocessing).astype(np.float32)
        (logits,) = session.run([meta.output.name], {meta.input.name: batch})
        out.append(meta.calibrated_probabilities(logits)[:, meta.positive_index])
    return np.concatenate(out)


def reference_block(onnx_path: Path, meta: ModelMetadata, records: list[Record]) -> dict:
    """The `monitoring` block for the contract, from the validation records."""
    p = validation_probabilities(onnx_path, meta, records)
    reference = ProbabilityReference.from_probabilities(
        p,
        split="validation",
        computed_with=(
            f"{len(records)} validation images of the split manifest, training preprocessing, "
            f"{onnx_path.name} on ONNX Runtime CPU, the contract's calibration; decile bins"
        ),
    )
    return {"reference": reference.model_dump()}


def add_reference(metadata_path: Path, split_path: Path) -> dict:
    """Write (or replace) the `monitoring` block of an exported model's metadata file."""
    raw = json.loads(metadata_path.read_text(encoding="utf-8"))
    meta = ModelMetadata.model_validate(raw)
    records = read_split(split_path)["val"]
    raw["monitoring"] = reference_block(metadata_path.parent / meta.onnx_file, meta, records)
    ModelMetadata.model_validate(raw)  # never write a file the service would refuse
    metadata_path.write_text(dump_metadata(raw), encoding="utf-8")
    return raw["monitoring"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="the model's metadata JSON")
    p.add_argument("--split", type=Path, required=True, help="its split manifest (split.csv)")
    args = p.parse_args(argv)
    block = add_reference(args.model, args.split)
    ref = block["reference"]
    print(
        f"[monitoring] {ref['n_images']} validation images, {len(ref['fractions'])} bins: "
        f"edges {ref['bin_edges']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
