"""The same X-ray as a JPEG and as DICOM gets the same answer from the shipped model.

Real test X-rays (8-bit JPEGs) are re-packed as the DICOM files a hospital would send: 8-bit with
a window, 12-bit with a window, MONOCHROME1, with a modality rescale, and JPEG-encapsulated. Each
must come back with its UIDs and a PNEUMONIA probability within 0.02 of the JPEG's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.model.classifier import Classifier
from app.model.loading import load_classifier
from app.settings import Settings
from app.testing.dicom_files import SOP_UID, STUDY_UID, make_dicom
from tests.support.realdata import DATA_DIR, SHIPPED_METADATA, requires_data, requires_shipped_model

pytestmark = [requires_shipped_model, requires_data]

TOLERANCE = 0.02


def _twelve_bit(p: np.ndarray) -> np.ndarray:
    """8-bit grey levels spread over 12 bits (the middle of each 16-value bin)."""
    return (p.astype(np.uint16) * 16 + 8).astype(np.uint16)


# name -> (8-bit pixels -> DICOM bytes)
VARIANTS: dict[str, Callable[[np.ndarray], bytes]] = {
    "8bit-window": lambda p: make_dicom(p, window=(128.0, 256.0), bits_stored=8),
    "12bit-window": lambda p: make_dicom(_twelve_bit(p), window=(2048.0, 4096.0), bits_stored=12),
    "monochrome1": lambda p: make_dicom(
        (4095 - _twelve_bit(p)).astype(np.uint16),
        photometric="MONOCHROME1",
        window=(2048.0, 4096.0),
        bits_stored=12,
    ),
    "modality-rescale": lambda p: make_dicom(
        (_twelve_bit(p) * 2 + 1000).astype(np.uint16),
        rescale=(0.5, -500.0),
        window=(2048.0, 4096.0),
        bits_stored=14,
    ),
    "jpeg-encapsulated": lambda p: make_dicom(
        p, "jpeg_baseline", window=(128.0, 256.0), bits_stored=8
    ),
    "jpeg-ls-12bit": lambda p: make_dicom(
        _twelve_bit(p), "jpeg_ls", window=(2048.0, 4096.0), bits_stored=12
    ),
}


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return load_classifier(Settings(model_metadata=SHIPPED_METADATA, provider="cpu"))


def _test_images() -> list[Path]:
    normal = sorted((DATA_DIR / "test" / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))
    return normal[::29][:8] + pneumonia[::48][:8]


def _pneumonia(classifier: Classifier, data: bytes) -> tuple[float, object]:
    prepared = classifier.prepare(data)
    probability = classifier.predict_batch(prepared.tensor)[0][classifier.metadata.positive_index]
    return float(probability), prepared.dicom


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jpeg_and_dicom_of_the_same_x_ray_get_the_same_probability(
    classifier: Classifier, variant: str
) -> None:
    differences = []
    for path in _test_images():
        jpeg = path.read_bytes()
        pixels = np.asarray(Image.open(path).convert("L"))
        from_jpeg, _ = _pneumonia(classifier, jpeg)
        from_dicom, findings = _pneumonia(classifier, VARIANTS[variant](pixels))
        assert findings is not None
        assert (findings.study_instance_uid, findings.sop_instance_uid) == (STUDY_UID, SOP_UID)
        differences.append(abs(from_jpeg - from_dicom))
    assert len(differences) == 16
    assert max(differences) <= TOLERANCE, (variant, max(differences))


def test_a_full_resolution_12_bit_dicom_through_the_http_api() -> None:
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    big = Image.open(source).convert("L").resize((2048, 2500), Image.Resampling.BICUBIC)
    data = make_dicom(
        _twelve_bit(np.asarray(big)), "jpeg_ls", window=(2048.0, 4096.0), bits_stored=12
    )
    with TestClient(create_app(Settings(model_metadata=SHIPPED_METADATA, provider="cpu"))) as c:
        response = c.post("/predict", content=data, headers={"content-type": "application/dicom"})
        assert c.get("/health/ready").status_code == 200
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dicom"]["sop_instance_uid"] == SOP_UID
    assert body["dicom"]["window"]["source"] == "window"
    assert body["label"] == "PNEUMONIA"
