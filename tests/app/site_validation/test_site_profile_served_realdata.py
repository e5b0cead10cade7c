"""The acceptance check of a site profile through the running service: the official test split used
as a site, a profile fitted by `pneumonia-validate-site` on half its patients (scored over HTTP by a
uvicorn process without a profile), then the other half served over HTTP by a second uvicorn
process started with CXR_SITE_PROFILE. Its answers must reach ECE <= 0.05, sensitivity >= 0.93
and specificity >= 0.85 at the site threshold (target sensitivity 0.95)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.model import site_profile
from app.site_validation.metrics import expected_calibration_error
from app.site_validation.validate import main
from tests.support.realdata import DATA_DIR, SHIPPED_METADATA, requires_data, requires_shipped_model
from tests.support.testkit import UvicornProcess

pytestmark = [requires_data, requires_shipped_model]

SITE = DATA_DIR / "test"


def service_settings(**extra: str) -> dict[str, str]:
    return {
        "CXR_MODEL_METADATA": str(SHIPPED_METADATA),
        "CXR_PROVIDER": "cpu",
        "CXR_DRAIN_SECONDS": "0",
        "CXR_LOG_LEVEL": "WARNING",
        **extra,
    }


@pytest.fixture(scope="module")
def site_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("served-site")
    out = root / "out"
    with UvicornProcess.serving(root / "plain.log", service_settings()) as server:
        code = main(
            [
                str(SITE),
                "--out",
                str(out),
                "--service",
                server.base_url,
                "--evaluate-split",
                "--split-repeats",
                "0",
                "--resamples",
                "200",
            ]
        )
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_the_held_out_half_passes_through_the_service_with_the_profile(
    site_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, results = site_run
    split = results["split_half"]
    profile_path = out / "split_half" / "site_profile.json"
    profile = site_profile.load(profile_path)
    held = split["held_out_files"]
    images = {image["file"]: image for image in results["images"]}
    assert held and set(held) <= set(images)
    fitted_on = split["fitted_on"]["images"]
    assert fitted_on + len(held) == results["data"]["n_answered"]

    settings = service_settings(CXR_SITE_PROFILE=str(profile_path))
    with (
        UvicornProcess.serving(tmp_path / "profile.log", settings) as server,
        httpx.Client(base_url=server.base_url, timeout=120.0) as client,
    ):
        info = client.get("/model").json()
        answers = []
        for name in held:
            response = client.post(
                "/predict",
                content=(SITE / name).read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            assert response.status_code == 200, response.text
            answers.append(response.json())

    assert info["site_calibration"]["sha256"] == profile.sha256
    assert info["site_calibration"]["threshold"] == profile.operating.threshold
    assert {a["calibration"]["sha256"] for a in answers} == {profile.sha256}
    assert {a["threshold"] for a in answers} == {profile.operating.threshold}
    truth = np.array([images[name]["label"] == "PNEUMONIA" for name in held])
    p_site = np.array([a["probabilities"]["PNEUMONIA"] for a in answers])
    called = np.array([a["label"] == "PNEUMONIA" for a in answers])
    # The service's answers are the profile applied to the model's own answers of the first run.
    p_model = np.array([images[name]["p_served"] for name in held])
    np.testing.assert_allclose(
        [a["calibration"]["model_probabilities"]["PNEUMONIA"] for a in answers], p_model, atol=1e-12
    )
    np.testing.assert_allclose(p_site, profile.apply(p_model), atol=1e-12)
    np.testing.assert_array_equal(called, p_site >= profile.operating.threshold)

    ece = expected_calibration_error(truth, p_site)
    sensitivity = float(called[truth].mean())
    specificity = float((~called[~truth]).mean())
    print(
        f"\nsplit-half through the service: {len(held)} images, ECE {ece:.4f}, sensitivity "
        f"{sensitivity:.4f}, specificity {specificity:.4f}, threshold "
        f"{profile.operating.threshold:.4f}"
    )
    assert ece == pytest.approx(split["held_out"]["ece"], abs=1e-12)  # as the tool measured
    assert ece <= 0.05
    assert sensitivity >= 0.93
    assert specificity >= 0.85
