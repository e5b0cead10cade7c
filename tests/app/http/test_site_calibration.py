"""CXR_SITE_PROFILE: a site's recalibration and threshold on top of the model's own calibration.

The tiny model answers P(PNEUMONIA) = sigmoid(8 m - 4) for an image of mean input m (see
`tests.support.testkit`). The site's figures are worked out here by hand from the profile's formula
and the model's own answer without a profile, not by the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.support.testkit import encode, make_settings, site_profile_for

LEVEL = 128  # grey level of the test image: m = 128/255, P(PNEUMONIA) just above 0.5
SLOPE, INTERCEPT, SITE_THRESHOLD = 2.0, -1.0, 0.3
# ONNX Runtime averages the 224 x 224 input in float32, so the model's answer is checked against
# sigmoid(8 m - 4) loosely; the site's figures are then computed from that answer, to 1e-12.
MODEL_TOLERANCE = 1e-3
EXACT = 1e-12


def grey_png(level: int = LEVEL) -> bytes:
    return encode(Image.new("L", (300, 260), level), "PNG")


def by_hand_model(level: int = LEVEL) -> float:
    """The model's P(PNEUMONIA) for a uniform image of `level`, as the tiny graph computes it."""
    return 1.0 / (1.0 + math.exp(-(8.0 * (level / 255.0) - 4.0)))


def by_hand_site(p: float) -> float:
    """The profile's p' = sigmoid(slope * logit(p) + intercept)."""
    return 1.0 / (1.0 + math.exp(-(SLOPE * math.log(p / (1.0 - p)) + INTERCEPT)))


def model_answer(model_path: Path, level: int = LEVEL) -> float:
    """P(PNEUMONIA) as the service answers without a profile."""
    with serve(model_path, None) as client:
        return float(predict(client, grey_png(level))["probabilities"]["PNEUMONIA"])


def sha256_of_model(model_path: Path) -> str:
    return str(json.loads(model_path.read_text())["sha256"])


def write_profile(tmp_path: Path, profile: dict[str, Any]) -> Path:
    path = tmp_path / "site_profile.json"
    path.write_text(json.dumps(profile, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def profile_path(tmp_path: Path, model_path: Path) -> Path:
    return write_profile(
        tmp_path,
        site_profile_for(
            sha256_of_model(model_path),
            slope=SLOPE,
            intercept=INTERCEPT,
            threshold=SITE_THRESHOLD,
            name="st-elsewhere-2026",
        ),
    )


def serve(model_path: Path, profile: Path | None) -> TestClient:
    return TestClient(create_app(make_settings(model_path, site_profile=profile)))


def predict(client: TestClient, data: bytes | None = None) -> dict[str, Any]:
    response = client.post(
        "/predict", content=data or grey_png(), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_without_a_profile_the_model_threshold_decides_and_no_calibration_appears(
    model_path: Path,
) -> None:
    with serve(model_path, None) as client:
        body = predict(client)
        info = client.get("/model").json()
    assert "calibration" not in body
    assert "site_calibration" not in info
    assert body["label"] == "PNEUMONIA"  # p = 0.504 >= the model's 0.5
    assert body["threshold"] == 0.5
    assert body["probabilities"]["PNEUMONIA"] == pytest.approx(by_hand_model(), abs=MODEL_TOLERANCE)


def test_a_profile_recalibrates_and_its_threshold_gives_the_label(
    model_path: Path, profile_path: Path
) -> None:
    p = model_answer(model_path)
    p_site = by_hand_site(p)
    assert p >= 0.5 > SITE_THRESHOLD > p_site  # the profile turns this answer round
    with serve(model_path, profile_path) as client:
        body = predict(client)
    assert body["label"] == "NORMAL"
    assert body["threshold"] == SITE_THRESHOLD
    assert body["probabilities"]["PNEUMONIA"] == pytest.approx(p_site, abs=EXACT)
    assert body["probabilities"]["NORMAL"] == pytest.approx(1.0 - p_site, abs=EXACT)
    calibration = body["calibration"]
    assert calibration["model_probabilities"]["PNEUMONIA"] == p
    assert calibration["model_probabilities"]["NORMAL"] == pytest.approx(1.0 - p, abs=EXACT)
    canonical = json.dumps(
        json.loads(profile_path.read_text()), sort_keys=True, separators=(",", ":")
    )
    assert {k: v for k, v in calibration.items() if k != "model_probabilities"} == {
        "profile": "st-elsewhere-2026",
        "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "method": "platt",
        "slope": SLOPE,
        "intercept": INTERCEPT,
        "threshold": SITE_THRESHOLD,
        "positive_class": "PNEUMONIA",
        "target_sensitivity": 0.95,
        "model_threshold": 0.5,
    }


def test_a_bright_image_stays_positive_under_the_profile(
    model_path: Path, profile_path: Path
) -> None:
    p_site = by_hand_site(model_answer(model_path, 200))
    assert p_site >= SITE_THRESHOLD
    with serve(model_path, profile_path) as client:
        body = predict(client, grey_png(200))
    assert body["label"] == "PNEUMONIA"
    assert body["probabilities"]["PNEUMONIA"] == pytest.approx(p_site, abs=EXACT)


def test_model_info_says_which_calibration_and_threshold_give_the_label(
    model_path: Path, profile_path: Path
) -> None:
    with serve(model_path, None) as client:
        plain = client.get("/model").json()
    with serve(model_path, profile_path) as client:
        info = client.get("/model").json()
        answer = predict(client)
    site = info.pop("site_calibration")
    assert info == plain  # the model's own contract is reported unchanged
    assert site == {k: v for k, v in answer["calibration"].items() if k != "model_probabilities"}


def test_every_answer_of_a_batch_carries_the_calibration(
    model_path: Path, profile_path: Path
) -> None:
    p_site = by_hand_site(model_answer(model_path))
    with serve(model_path, profile_path) as client:
        response = client.post(
            "/predict/batch", files=[("file", ("a.png", grey_png(), "image/png"))] * 2
        )
    assert response.status_code == 200
    for item in response.json()["results"]:
        assert item["prediction"]["label"] == "NORMAL"
        assert item["prediction"]["calibration"]["threshold"] == SITE_THRESHOLD
        answered = item["prediction"]["probabilities"]["PNEUMONIA"]
        # The two images may share one batched model run, whose float32 sums are not the single
        # run's (measured up to ~1e-6 apart): the same rule, to the model's own precision.
        assert answered == pytest.approx(p_site, abs=1e-5)


def _other_model(profile: dict[str, Any]) -> None:
    profile["model"]["sha256"] = "b" * 64


def _unknown_key(profile: dict[str, Any]) -> None:
    profile["operating"]["threshhold"] = 0.3


def _other_positive_class(profile: dict[str, Any]) -> None:
    profile["operating"]["positive_class"] = "NORMAL"


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_other_model, "was fitted for model sha256 bbbbbbbbbbbb"),
        (_unknown_key, "is invalid: operating.threshhold"),
        (_other_positive_class, "decides for 'NORMAL', the model for 'PNEUMONIA'"),
    ],
)
def test_a_profile_that_does_not_fit_keeps_the_service_not_ready(
    tmp_path: Path,
    model_path: Path,
    spoil: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    profile = site_profile_for(sha256_of_model(model_path))
    spoil(profile)
    with serve(model_path, write_profile(tmp_path, profile)) as client:
        ready = client.get("/health/ready")
        refused = client.post("/predict", content=grey_png(), headers={"content-type": "image/png"})
    assert ready.status_code == 503
    assert reason in ready.json()["error"]["message"]
    assert refused.status_code == 503


def test_a_missing_profile_file_keeps_the_service_not_ready(
    tmp_path: Path, model_path: Path
) -> None:
    with serve(model_path, tmp_path / "absent.json") as client:
        ready = client.get("/health/ready")
        metrics = client.get("/metrics").text
    assert ready.status_code == 503
    assert "cannot read site profile" in ready.json()["error"]["message"]
    assert "\ncxr_ready 0.0\n" in metrics


def test_results_delivered_under_a_profile_are_a_reading_of_their_own(
    tmp_path: Path, model_path: Path, profile_path: Path
) -> None:
    """`deliver=true` under a site profile makes result objects whose UIDs name that reading:
    the same image read without the profile (or before it was loaded) keeps the other UIDs and the
    other answer, side by side in the outbox, instead of one UID standing for two findings."""
    import pydicom

    from app.pacs.uids import pixel_data_digest, result_instance_uid
    from app.testing.dicom_files import make_dicom, ramp

    data = make_dicom(ramp(rows=256, columns=224))
    state = tmp_path / "state"
    readings = {}
    for profile in (None, profile_path):
        settings = make_settings(model_path, site_profile=profile, state_dir=state)
        with TestClient(create_app(settings)) as client:
            answer = client.post(
                "/predict",
                params={"deliver": "true"},
                content=data,
                headers={"content-type": "application/dicom"},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            source = body["result"]["source_sop_instance_uid"]
            (sr,) = [o for o in body["result"]["objects"] if o["kind"] == "sr"]
            stored = client.get(f"/results/{source}").json()
            assert stored["answer"]["label"] == body["label"]
            assert stored["answer"]["probabilities"] == body["probabilities"]
            sr_bytes = client.get(f"/results/{source}/sr").content
            readings[profile] = (body, sr["sop_instance_uid"], sr_bytes)
    plain, profiled = readings[None], readings[profile_path]
    model_sha = sha256_of_model(model_path)
    profile_sha = profiled[0]["calibration"]["sha256"]
    # the pixel data joins the UIDs (issue 26): the same digest under both readings
    digest = pixel_data_digest(pydicom.dcmread(io.BytesIO(data)).PixelData)
    assert plain[1] == result_instance_uid(source, model_sha, "sr", None, digest)
    assert profiled[1] == result_instance_uid(source, model_sha, "sr", profile_sha, digest)
    assert plain[1] != profiled[1]
    assert plain[0]["probabilities"] != profiled[0]["probabilities"]
    assert f"site profile sha256={profile_sha}".encode() in profiled[2]
    assert b"site profile sha256" not in plain[2]
