"""The shipped model in `models/`, run over the official test split through the *service's* own
decode and preprocessing code, reproduces the test figures recorded in its metadata.

Tolerance: the recorded figures were computed by `training.evaluate` with the same ONNX file and
bit-identical preprocessing (see test_train_serve_parity), so probabilities agree to float32
rounding; 1e-4 on each metric leaves room only for that.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from app.contract import load_metadata
from app.model.loading import load_classifier
from app.settings import Settings
from tests.support.realdata import (
    DATA_DIR,
    REPO_ROOT,
    SHIPPED_METADATA,
    requires_data,
    requires_shipped_model,
)
from training.data import CLASSES, load_kaggle_directory
from training.metrics import POINT_METRICS, evaluate_scores
from training.selection import HALVES_FILE, read_halves

pytestmark = [requires_shipped_model]

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def classifier():  # type: ignore[no-untyped-def]
    return load_classifier(Settings(model_metadata=SHIPPED_METADATA, provider="cpu"))


def _recorded_split(meta) -> str:  # type: ignore[no-untyped-def]
    """Where the model's honest test figures are: half B under the selection protocol (2.0.0 on),
    or the whole test split (1.0.0)."""
    return "test_b" if "test_b" in meta.metrics else "test"


def test_shipped_metadata_records_honest_figures_and_meets_the_targets() -> None:
    meta = load_metadata(SHIPPED_METADATA)
    assert meta.decision.chosen_on == "validation"
    split = _recorded_split(meta)
    assert {"validation", split} <= set(meta.metrics)
    test = meta.metrics[split]
    assert isinstance(test, dict)
    assert test["n"] == (315 if split == "test_b" else 624)
    # the "must" targets of the shipped model, at the validation-chosen threshold
    assert test["roc_auc"]["value"] >= 0.95
    assert test["accuracy"]["value"] >= 0.90
    assert (SHIPPED_METADATA.parent / meta.onnx_file).stat().st_size < 30 * 1024 * 1024


def _test_records(split: str):  # type: ignore[no-untyped-def]
    records = load_kaggle_directory(DATA_DIR, "test")
    if split == "test":
        return records
    halves = read_halves(REPO_ROOT / HALVES_FILE)
    return [r for r in records if halves[f"{r.class_name}/{Path(r.path).name}"] == "B"]


@requires_data
def test_service_preprocessing_reproduces_the_recorded_test_figures(classifier) -> None:  # type: ignore[no-untyped-def]
    """The recorded figures (half B's one scoring, or 1.0.0's whole-split evaluation) come back
    exactly through the service's decode and preprocessing. A reproduction of the record, not a
    new scoring: nothing is chosen or tuned from it."""
    meta = classifier.metadata
    split = _recorded_split(meta)
    records = _test_records(split)
    scores = []
    for record in records:
        batch = classifier.preprocess(Path(record.path).read_bytes())
        scores.append(classifier.predict_batch(batch)[0][meta.positive_index])
    labels = np.array([r.label for r in records])
    recorded = meta.metrics[split]
    assert isinstance(recorded, dict)
    groups = [r.patient_id for r in records]
    if split == "test_b":
        by_file = _groups()  # the bootstrap of the record resampled the halves' patient groups
        groups = [by_file[f"{r.class_name}/{Path(r.path).name}"] for r in records]
    measured = evaluate_scores(labels, np.array(scores), meta.decision.threshold, groups, seed=0)
    assert measured["confusion_matrix"] == recorded["confusion_matrix"]
    assert measured["ece"] == pytest.approx(recorded["ece"], abs=TOLERANCE)
    for name in POINT_METRICS:
        assert measured[name]["value"] == pytest.approx(recorded[name]["value"], abs=TOLERANCE), (
            name
        )
    assert tuple(meta.classes) == CLASSES


def _groups() -> dict[str, str]:
    import csv

    with (REPO_ROOT / HALVES_FILE).open() as f:
        return {f"{r['label']}/{r['filename']}": r["group"] for r in csv.DictReader(f)}


@requires_data
def test_the_service_answers_a_full_resolution_x_ray_with_the_shipped_model() -> None:
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from app.main import create_app

    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    big = Image.open(source).convert("L").resize((2400, 2000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92)
    with TestClient(create_app(Settings(model_metadata=SHIPPED_METADATA, provider="cpu"))) as c:
        response = c.post("/predict", files={"file": ("x.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["sha256"] == load_metadata(SHIPPED_METADATA).sha256
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    assert body["label"] in CLASSES


@requires_data
def test_batched_answers_equal_single_image_answers_on_real_images(classifier) -> None:  # type: ignore[no-untyped-def]
    """The service batches whatever is queued; that must not change a single answer."""
    import asyncio

    from app.serving.batching import BatchingEngine

    paths = sorted((DATA_DIR / "test").glob("*/*.jpeg"))[::13]
    tensors = [classifier.preprocess(p.read_bytes()) for p in paths]
    single = np.concatenate([classifier.predict_batch(t) for t in tensors])
    sizes: list[int] = []

    class Sizes:
        def batch_ran(self, size: int, queue_waits: list[float], run_seconds: float) -> None:
            sizes.append(size)

    async def batched() -> list[np.ndarray]:
        engine = BatchingEngine(classifier.predict_batch, max_batch_size=16, observer=Sizes())
        engine.start()
        try:
            return await asyncio.gather(*(engine.infer(t) for t in tensors))
        finally:
            await engine.aclose()

    together = np.concatenate(asyncio.run(batched()))
    assert len(paths) >= 40
    assert max(sizes) == 16 and sum(sizes) == len(paths)  # it really ran batches
    assert np.abs(together - single).max() < 1e-5


@requires_data
@pytest.mark.parametrize("size", [(2500, 2048), (2048, 2500), (3000, 2400)])
def test_dct_scaling_keeps_full_resolution_answers_within_0_02(size: tuple[int, int]) -> None:
    """Real test X-rays upscaled to detector sizes: decoding them at the contract's DCT scale moves
    p(PNEUMONIA) by at most 0.02 against decoding them at full size (a sample here; the whole split
    is in docs/PERFORMANCE.md, from `python -m training.full_resolution`)."""
    from training.data import load_kaggle_directory
    from training.full_resolution import compare_at_size

    images = [Path(r.path) for r in load_kaggle_directory(DATA_DIR, "test")][::24]
    result = compare_at_size(SHIPPED_METADATA, images, size)
    assert result["n_images"] == 26
    assert result["max_abs_diff"] <= 0.02, result


@requires_data
def test_the_j2k_reduction_keeps_full_resolution_answers_within_0_02() -> None:
    """Real test X-rays upscaled to 2500x2048 and stored as 12-bit JPEG 2000 DICOM in each wavelet
    the shipped rule reduces (9/7 lossy; 5/3 lossless where the model passed the criterion):
    decoding them at the contract's level moves p(PNEUMONIA) by at most 0.02 against decoding them
    in full (a sample here; every 4th image of the split at two sizes is in docs/PERFORMANCE.md,
    from `python -m training.full_resolution --dicom-j2k`)."""
    from training.full_resolution import compare_j2k_at_size

    rule = load_metadata(SHIPPED_METADATA).preprocessing.dicom_j2k_reduction
    assert rule is not None and "9/7" in rule.wavelets
    syntaxes = {"9/7": "j2k", "5/3": "j2k_lossless"}
    images = [Path(r.path) for r in load_kaggle_directory(DATA_DIR, "test")][::24]
    results = compare_j2k_at_size(
        SHIPPED_METADATA, images, (2500, 2048), [rule], tuple(syntaxes[w] for w in rule.wavelets)
    )
    assert len(results) == len(rule.wavelets)
    for result in results:
        assert result["n_images"] == 26
        assert result["max_abs_diff"] <= 0.02, result


@requires_data
def test_a_lossless_jpeg_2000_dicom_answers_as_the_same_x_ray_as_a_jpeg(classifier) -> None:  # type: ignore[no-untyped-def]
    """Real test X-rays at 2500x2048, uploaded once as a JPEG (quality 95) and once as 12-bit
    lossless JPEG 2000 DICOM: the service's answers agree within 0.02, whatever the contract's
    rules decode at a reduced scale (DCT for the JPEG, wavelet level for the JPEG 2000 frame)."""
    import io

    from PIL import Image

    from app.testing.dicom_files import make_dicom

    meta = classifier.metadata
    worst = 0.0
    for path in sorted((DATA_DIR / "test").glob("*/*.jpeg"))[::24]:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L").resize((2500, 2048), Image.Resampling.BICUBIC))
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, "JPEG", quality=95)
        twelve_bit = grey.astype(np.uint16) * 16 + 8
        dicom = make_dicom(twelve_bit, "j2k_lossless", window=(2048.0, 4096.0), bits_stored=12)
        p = [
            classifier.predict_batch(classifier.preprocess(data))[0][meta.positive_index]
            for data in (buffer.getvalue(), dicom)
        ]
        worst = max(worst, abs(p[0] - p[1]))
    assert worst <= 0.02, worst


PREVIOUS = sorted(SHIPPED_METADATA.parent.glob(f"*/{SHIPPED_METADATA.name}"))


@requires_data
@pytest.mark.skipif(not PREVIOUS, reason="no earlier model version is archived under models/")
def test_tone_curves_move_the_answers_at_most_half_as_much_as_the_previous_model() -> None:
    """Every 4th test X-ray uploaded as it is and through gamma 0.7 and 1.4 (as PNG): the mean
    change of p(PNEUMONIA), through the service's decode and preprocessing, is at most half of what
    it is for the model this one replaced. No labels are read."""
    import io

    from PIL import Image

    paths = sorted((DATA_DIR / "test").glob("*/*.jpeg"))[::4]
    originals = [p.read_bytes() for p in paths]
    bent = {}
    for gamma in (0.7, 1.4):
        bent[gamma] = []
        for path in paths:
            grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
            pixels = np.clip(np.rint(255.0 * (grey / 255.0) ** gamma), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            bent[gamma].append(buffer.getvalue())

    def mean_change(metadata: Path, gamma: float) -> float:
        served = load_classifier(Settings(model_metadata=metadata, provider="cpu"))
        index = served.metadata.positive_index

        def p(data: bytes) -> float:
            return float(served.predict_batch(served.preprocess(data))[0][index])

        return float(
            np.mean([abs(p(a) - p(b)) for a, b in zip(originals, bent[gamma], strict=True)])
        )

    for gamma in (0.7, 1.4):
        shipped, previous = mean_change(SHIPPED_METADATA, gamma), mean_change(PREVIOUS[-1], gamma)
        assert shipped <= previous / 2, (gamma, shipped, previous)


@requires_data
def test_explanations_have_at_least_7x7_cells_drawn_at_their_receptive_fields() -> None:
    """`POST /predict?explain=true` with the shipped model: a map of at least 7x7 cells, each on a
    32 px or finer stride of the input (exactness: tests/training/test_cam.py and
    tests/app/model/test_explain.py)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.model.explain import cell_stride

    meta = load_metadata(SHIPPED_METADATA)
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[3]
    with TestClient(create_app(Settings(model_metadata=SHIPPED_METADATA, provider="cpu"))) as c:
        response = c.post(
            "/predict?explain=true",
            files={"file": ("x.jpeg", source.read_bytes(), "image/jpeg")},
        )
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    grid = np.asarray(explanation["grid"])
    assert grid.shape[0] >= 7 and grid.shape[1] >= 7
    assert cell_stride(grid.shape[0], meta.preprocessing.height) <= 32


@requires_data
def test_the_site_arm_in_the_ledger_comes_back(tmp_path: Path) -> None:
    """Amendment 2's site arm, run again: `pneumonia-validate-site` on half A's images and labels,
    its profile loaded into the service for half B (`pneumonia-predict`), gives the figures the
    ledger holds for the shipped model."""
    import csv
    import json
    import os

    from app.cli import predict
    from app.site_validation import validate
    from tests.support.testkit import make_settings
    from training.selection import LEDGER_FILE, site_arm_figures

    meta = load_metadata(SHIPPED_METADATA)
    arms = [
        e
        for e in map(json.loads, (REPO_ROOT / LEDGER_FILE).read_text().splitlines())
        if e["event"] == "site_arm" and e["model_sha256"] == meta.sha256
    ]
    if not arms:
        pytest.skip("no site-arm reading recorded for the shipped model")
    with (REPO_ROOT / HALVES_FILE).open() as f:
        rows = list(csv.DictReader(f))
    for half in ("A", "B"):
        for label in CLASSES:
            (tmp_path / half / label).mkdir(parents=True)
        with (tmp_path / half / "manifest.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["filename", "label", "patient_id"])
            writer.writeheader()
            for r in rows:
                if r["half"] == half:
                    source = DATA_DIR / "test" / r["label"] / r["filename"]
                    os.symlink(source, tmp_path / half / r["label"] / r["filename"])
                    writer.writerow(
                        {"filename": r["filename"], "label": r["label"], "patient_id": r["group"]}
                    )
    out = tmp_path / "A-out"
    code = validate.main(
        [str(tmp_path / "A"), "--out", str(out), "--model", str(SHIPPED_METADATA), "--name", "A"]
    )
    assert code == 0
    profile = out / "site_profile.json"
    settings = make_settings(SHIPPED_METADATA, site_profile=profile)
    files = sorted((tmp_path / "B").glob("*/*.jpeg"))
    answers, classes = asyncio.run(predict.predict_files(files, settings))
    answers_csv = tmp_path / "b.csv"
    with answers_csv.open("w", newline="") as f:
        predict.write_rows(answers, classes, "csv", f)
    figures = site_arm_figures(answers_csv, profile)
    recorded = arms[-1]["figures"]
    for key in POINT_METRICS:
        assert figures[key]["value"] == pytest.approx(recorded[key]["value"], abs=TOLERANCE), key
    assert figures["confusion_matrix"] == recorded["confusion_matrix"]
    assert figures["ece"] == pytest.approx(recorded["ece"], abs=TOLERANCE)
