"""The drift reference written into the model contract: the validation split's calibrated
P(positive) through the ONNX file, in decile bins, the probabilities the service answers for those
files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from app.contract import dump_metadata, load_metadata
from app.model.loading import load_classifier
from tests.support.testkit import make_settings, write_model_dir
from training.monitoring import add_reference, main


def write_split(root: Path, n: int = 40) -> Path:
    """A split manifest whose `val` rows are uniform grey JPEGs of many levels (and one `train`)."""
    rows = []
    for i in range(n):
        path = root / f"val_{i:03d}.jpeg"
        Image.new("L", (256, 240), int(5 + i * 245 / n)).save(path, quality=95)
        rows.append(("val", "PNEUMONIA" if i % 2 else "NORMAL", f"p{i}", str(path), ""))
    train = root / "train_000.jpeg"
    Image.new("L", (256, 240), 255).save(train)
    rows.append(("train", "NORMAL", "t0", str(train), ""))
    manifest = root / "split.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "label", "patient_id", "path", "sha256"])
        writer.writerows(rows)
    return manifest


def test_the_reference_is_the_served_probabilities_of_the_validation_split(
    tmp_path: Path,
) -> None:
    meta_path = write_model_dir(tmp_path)
    before = json.loads(meta_path.read_text())
    manifest = write_split(tmp_path)
    assert main(["--model", str(meta_path), "--split", str(manifest)]) == 0

    after = json.loads(meta_path.read_text())
    reference = load_metadata(meta_path).monitoring.reference  # type: ignore[union-attr]
    assert {k: v for k, v in after.items() if k != "monitoring"} == before
    assert reference.split == "validation" and reference.n_images == 40
    assert len(reference.fractions) == 10
    classifier = load_classifier(make_settings(meta_path))
    served = np.array(
        [
            classifier.predict_batch(classifier.preprocess(Path(row["path"]).read_bytes()))[0][1]
            for row in csv.DictReader(manifest.open())
            if row["split"] == "val"
        ]
    )
    counts = np.bincount(reference.bin_of(served), minlength=len(reference.fractions))
    np.testing.assert_allclose(counts / len(served), reference.fractions, atol=1e-6)


def test_adding_it_again_replaces_it(tmp_path: Path) -> None:
    meta_path = write_model_dir(tmp_path)
    manifest = write_split(tmp_path)
    first = add_reference(meta_path, manifest)
    text = meta_path.read_text()
    assert add_reference(meta_path, manifest) == first
    assert meta_path.read_text() == text == dump_metadata(json.loads(text))
