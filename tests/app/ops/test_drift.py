"""Drift monitoring in /metrics: answers, input statistics on bounded label sets, and the PSI of the
last answers against the contract's reference, worked out by hand on the tiny model.

The tiny model answers P(PNEUMONIA) = sigmoid(8 m - 4) for an image of mean input m, so a uniform
grey image of level 0 lands in the reference's first bin, 128 in its third and 255 in its last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from app.contract import ProbabilityReference
from app.main import create_app
from app.ops.drift import (
    DriftWindow,
    manufacturer_label,
    population_stability_index,
)
from app.serving.prediction import ServedAnswer
from app.testing.dicom_files import make_dicom, ramp
from tests.app.ops.test_metrics import scrape, value
from tests.support.testkit import encode, make_settings, site_profile_for

REFERENCE: dict[str, Any] = {
    "split": "validation",
    "n_images": 400,
    "bin_edges": [0.0, 0.25, 0.5, 0.75, 1.0],
    "fractions": [0.25, 0.25, 0.25, 0.25],
    "computed_with": "written by hand for the tests",
}
WINDOW = 10


def psi_by_hand(counts: list[int], expected: list[float]) -> float:
    total = sum(counts)
    terms = []
    for c, e in zip(counts, expected, strict=True):
        o = max(c / total, 1e-4)
        terms.append((o - e) * math.log(o / e))
    return sum(terms)


def grey_png(level: int) -> bytes:
    return encode(Image.new("L", (300, 260), level), "PNG")


@pytest.fixture
def reference_model(write_model: Any) -> Path:
    path: Path = write_model(monitoring={"reference": REFERENCE})
    return path


@pytest.fixture
def drift_client(reference_model: Path) -> Iterator[TestClient]:
    settings = make_settings(reference_model, drift_window=WINDOW)
    with TestClient(create_app(settings)) as client:
        yield client


def post(client: TestClient, data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    response = client.post("/predict", content=data, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- the score -------------------------------------------------------------------------------------


def test_psi_matches_the_formula_with_empty_bins_floored() -> None:
    expected = np.array([0.25, 0.25, 0.25, 0.25])
    assert population_stability_index(expected, np.array([25, 25, 25, 25])) == 0.0
    counts = [1, 0, 2, 0]
    assert population_stability_index(expected, np.array(counts)) == pytest.approx(
        psi_by_hand(counts, [0.25] * 4), rel=1e-12
    )
    assert math.isnan(population_stability_index(expected, np.zeros(4)))


def test_the_window_keeps_only_the_last_answers() -> None:
    window = DriftWindow(ProbabilityReference.model_validate(REFERENCE), size=3)
    for p in (0.1, 0.1, 0.6, 0.9, 0.9):  # bins 0, 0, 2, 3, 3: the window holds 2, 3, 3
        window.add(p)
    assert len(window) == 3
    assert window.psi() == pytest.approx(psi_by_hand([0, 0, 1, 2], [0.25] * 4), rel=1e-12)


def test_bins_hold_their_lower_edge_and_the_last_holds_one() -> None:
    reference = ProbabilityReference.model_validate(REFERENCE)
    assert reference.bin_of(np.array([0.0, 0.2499, 0.25, 0.5, 0.75, 1.0])).tolist() == [
        0,
        0,
        1,
        2,
        3,
        3,
    ]


def test_a_reference_from_probabilities_has_decile_bins_of_a_tenth_each() -> None:
    p = np.random.default_rng(0).beta(0.5, 0.5, size=1000)
    reference = ProbabilityReference.from_probabilities(p, "validation", "a test")
    assert len(reference.fractions) == 10
    assert reference.fractions == pytest.approx([0.1] * 10, abs=0.0015)
    counts = np.bincount(reference.bin_of(p), minlength=10)
    np.testing.assert_allclose(counts / 1000, reference.fractions, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"bin_edges": [0.1, 0.5, 1.0], "fractions": [0.5, 0.5]},  # not from 0
        {"bin_edges": [0.0, 0.5, 0.5, 1.0], "fractions": [0.5, 0.0, 0.5]},  # not increasing
        {"fractions": [0.25, 0.25, 0.25]},  # one short
        {"fractions": [0.3, 0.3, 0.3, 0.3]},  # sums to 1.2
        {"bins": 4},  # unknown key
    ],
)
def test_a_reference_is_validated_strictly(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProbabilityReference.model_validate({**REFERENCE, **change})


# -- through the service ---------------------------------------------------------------------------


def test_the_service_scores_the_last_answers_against_the_contract_reference(
    drift_client: TestClient,
) -> None:
    metrics = scrape(drift_client)
    assert math.isnan(value(metrics["cxr_drift_psi"], "cxr_drift_psi"))  # nothing answered yet
    assert value(metrics["cxr_drift_window_size"], "cxr_drift_window_size") == WINDOW
    for level in (128, 128, 0):
        post(drift_client, grey_png(level))
    metrics = scrape(drift_client)
    assert value(metrics["cxr_drift_psi"], "cxr_drift_psi") == pytest.approx(
        psi_by_hand([1, 0, 2, 0], [0.25] * 4), rel=1e-9
    )
    assert value(metrics["cxr_drift_window_answers"], "cxr_drift_window_answers") == 3
    for _ in range(WINDOW):
        post(drift_client, grey_png(255))
    metrics = scrape(drift_client)
    assert value(metrics["cxr_drift_window_answers"], "cxr_drift_window_answers") == WINDOW
    assert value(metrics["cxr_drift_psi"], "cxr_drift_psi") == pytest.approx(
        psi_by_hand([0, 0, 0, WINDOW], [0.25] * 4), rel=1e-9
    )
    answers = metrics["cxr_answers"]
    assert value(answers, "cxr_answers_total", label="PNEUMONIA") == 12  # 128 and 255
    assert value(answers, "cxr_answers_total", label="NORMAL") == 1  # level 0
    probability = metrics["cxr_answer_positive_probability"]
    assert value(probability, "cxr_answer_positive_probability_count") == 13
    assert value(probability, "cxr_answer_positive_probability_bucket", le="0.05") == 1


def test_input_statistics_are_counted_without_request_content(drift_client: TestClient) -> None:
    post(drift_client, grey_png(128))
    dicom = make_dicom(ramp(), extra={"Manufacturer": "GE MEDICAL SYSTEMS"})
    post(drift_client, dicom, "application/dicom")
    secret = make_dicom(ramp(), extra={"Manufacturer": "ZEBRA-SENTINEL Maker^Name"})
    post(drift_client, secret, "application/dicom")
    text = drift_client.get("/metrics").text
    assert "ZEBRA" not in text and "SENTINEL" not in text
    metrics = scrape(drift_client)
    makers = metrics["cxr_input_manufacturer"]
    total = "cxr_input_manufacturer_total"
    assert value(makers, total, manufacturer="ge") == 1
    assert value(makers, total, manufacturer="other") == 1
    assert value(makers, total, manufacturer="not_dicom") == 1
    modality = metrics["cxr_input_modality"]
    assert value(modality, "cxr_input_modality_total", modality="DX") == 2
    assert value(modality, "cxr_input_modality_total", modality="not_dicom") == 1
    formats = metrics["cxr_input_format"]
    assert value(formats, "cxr_input_format_total", format="DICOM") == 2
    assert value(formats, "cxr_input_format_total", format="PNG") == 1
    side = metrics["cxr_input_image_longer_side_pixels"]
    bucket = "cxr_input_image_longer_side_pixels_bucket"
    assert value(side, bucket, le="256.0") == 2  # the 96 x 80 DICOM images
    assert value(side, bucket, le="512.0") == 3  # and the 300 x 260 PNG
    mean = metrics["cxr_input_grey_mean"]
    assert value(mean, "cxr_input_grey_mean_bucket", le="128.0") >= 1  # the uniform 128 image
    std = metrics["cxr_input_grey_std"]
    assert value(std, "cxr_input_grey_std_bucket", le="8.0") == 1  # only the uniform one is flat
    every_label = {
        s.labels.get(key)
        for family in ("cxr_input_manufacturer", "cxr_input_modality")
        for s in metrics[family]
        for key in ("manufacturer", "modality")
        if key in s.labels
    }
    assert len(every_label) <= 20  # a fixed list, whatever was sent


def test_the_uniform_image_mean_is_its_grey_level(drift_client: TestClient) -> None:
    post(drift_client, grey_png(128))
    metrics = scrape(drift_client)
    assert value(metrics["cxr_input_grey_mean"], "cxr_input_grey_mean_sum") == pytest.approx(
        128.0, abs=1e-3
    )
    assert value(metrics["cxr_input_grey_std"], "cxr_input_grey_std_sum") == pytest.approx(
        0.0, abs=1e-3
    )


def test_the_score_reads_the_models_probability_under_a_site_profile(
    tmp_path: Path, reference_model: Path
) -> None:
    sha = json.loads(reference_model.read_text())["sha256"]
    profile = tmp_path / "site_profile.json"
    # p' = sigmoid(2 logit(p) - 1): level 128's p = 0.504 (third bin) becomes 0.275 (second bin)
    profile.write_text(json.dumps(site_profile_for(sha, slope=2.0, intercept=-1.0, threshold=0.3)))
    settings = make_settings(reference_model, drift_window=WINDOW, site_profile=profile)
    with TestClient(create_app(settings)) as client:
        body = post(client, grey_png(128))
        metrics = scrape(client)
    assert 0.25 <= body["probabilities"]["PNEUMONIA"] < 0.5
    assert value(metrics["cxr_drift_psi"], "cxr_drift_psi") == pytest.approx(
        psi_by_hand([0, 0, 1, 0], [0.25] * 4), rel=1e-9
    )
    probability = metrics["cxr_answer_positive_probability"]
    assert value(probability, "cxr_answer_positive_probability_bucket", le="0.25") == 0
    assert value(probability, "cxr_answer_positive_probability_bucket", le="0.3") == 1
    assert value(metrics["cxr_answers"], "cxr_answers_total", label="NORMAL") == 1


def test_a_model_without_a_reference_has_no_score(client: TestClient) -> None:
    post(client, grey_png(128))
    metrics = scrape(client)
    assert math.isnan(value(metrics["cxr_drift_psi"], "cxr_drift_psi"))
    assert value(metrics["cxr_answers"], "cxr_answers_total", label="PNEUMONIA") == 1


@pytest.mark.parametrize(
    ("maker", "label"),
    [
        ("GE MEDICAL SYSTEMS", "ge"),
        ("GE Healthcare", "ge"),
        ("GE", "ge"),
        ("GEMINI Imaging", "other"),
        ("Philips Medical Systems", "philips"),
        ("FUJIFILM Corporation", "fujifilm"),
        ("KODAK", "carestream"),
        ("  SIEMENS ", "siemens"),
        ("Doe^John", "other"),
        (None, "not_recorded"),
    ],
)
def test_manufacturers_map_onto_a_fixed_list(maker: str | None, label: str) -> None:
    answer = ServedAnswer("NORMAL", 0.1, 0.1, 100.0, 20.0, (100, 100), "DICOM", "DX", maker)
    assert manufacturer_label(answer) == label


# -- monitoring/ -----------------------------------------------------------------------------------


def test_the_alert_rules_query_only_metrics_the_service_exposes(drift_client: TestClient) -> None:
    import re

    import yaml

    rules_file = Path(__file__).resolve().parents[3] / "monitoring" / "prometheus-alerts.yml"
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["alert"] for r in rules} >= {"CxrPredictionDriftModerate", "CxrPredictionDriftMajor"}
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[mhd]", rule["for"])
    queried = {name for r in rules for name in re.findall(r"\bcxr_[a-z_]+", r["expr"])}
    post(drift_client, grey_png(128))
    exposed = {s.name for samples in scrape(drift_client).values() for s in samples}
    assert queried, "the rules query nothing"
    assert queried <= exposed, queried - exposed
