"""`pneumonia-validate-site` end to end on real test X-rays with the shipped model: a Kaggle-style
subset through the service built in process, a DICOM folder with labels.csv (made from real JPEGs)
through a real uvicorn process over HTTP, and the report opened in headless Chromium with the
network blocked."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.contract import load_metadata
from app.main import create_app
from app.model import site_profile
from app.site_validation.validate import main
from app.testing.dicom_files import CT_STORAGE, make_dicom
from tests.support.realdata import DATA_DIR, SHIPPED_METADATA, requires_data, requires_shipped_model
from tests.support.testkit import UvicornProcess, make_settings

pytestmark = [requires_data, requires_shipped_model]

SENTINEL_ID = "SENTINEL-PID"
SENTINEL_NAME = "Sentinelname^Patient"


def _real(class_name: str, count: int) -> list[Path]:
    return sorted((DATA_DIR / "test" / class_name).glob("*.jpeg"))[:count]


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kaggle")
    data = root / "site-data"
    for class_name in ("NORMAL", "PNEUMONIA"):
        for i, source in enumerate(_real(class_name, 40)):
            sub = data / class_name / ("ward-b" if class_name == "PNEUMONIA" and i % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, sub / source.name)
    (data / "NORMAL" / "notes.txt").write_text("not an image\n")
    out = root / "out"
    code = main(
        [
            str(data),
            "--out",
            str(out),
            "--model",
            str(SHIPPED_METADATA.with_suffix(".onnx")),
            "--evaluate-split",
            "--split-repeats",
            "3",
            "--resamples",
            "200",
        ]
    )
    assert code == 0
    return {"data": data, "out": out, "results": json.loads((out / "results.json").read_text())}


def test_every_image_is_answered_or_refused_with_its_code(kaggle_run: dict[str, Any]) -> None:
    results = kaggle_run["results"]
    assert len(results["images"]) == 81
    assert results["refused"] == [
        {
            "file": "NORMAL/notes.txt",
            "label": "NORMAL",
            "status": 415,
            "error_code": "unsupported_media_type",
        }
    ]
    assert results["figures"]["counts"]["images"] == 80
    assert results["figures"]["counts"]["positive_images"] == 40


def test_probabilities_are_the_services_answers(kaggle_run: dict[str, Any]) -> None:
    results, data = kaggle_run["results"], kaggle_run["data"]
    by_file = {image["file"]: image for image in results["images"]}
    with TestClient(create_app(make_settings(SHIPPED_METADATA))) as client:
        for name in ("NORMAL/IM-0001-0001.jpeg", next(n for n in by_file if "ward-b" in n)):
            answer = client.post(
                "/predict",
                content=(data / name).read_bytes(),
                headers={"content-type": "image/jpeg"},
            ).json()
            assert by_file[name]["p_served"] == answer["probabilities"]["PNEUMONIA"]
    assert results["model"]["sha256"] == load_metadata(SHIPPED_METADATA).sha256


def test_images_of_one_patient_share_one_key(kaggle_run: dict[str, Any]) -> None:
    keys = {image["file"]: image["patient_key"] for image in kaggle_run["results"]["images"]}
    same = [keys[f"NORMAL/{n}"] for n in ("IM-0011-0001.jpeg", "IM-0011-0001-0001.jpeg")]
    assert same[0] == same[1]
    assert keys["NORMAL/IM-0001-0001.jpeg"] != same[0]
    assert all(re.fullmatch(r"[0-9a-f]{16}", key) for key in keys.values())


def test_profile_reproduces_the_site_probabilities(kaggle_run: dict[str, Any]) -> None:
    profile = site_profile.load(kaggle_run["out"] / "site_profile.json")
    profile.check_model(load_metadata(SHIPPED_METADATA).sha256)
    results = kaggle_run["results"]
    assert profile.sha256 == results["profile"]["sha256"]
    answered = [i for i in results["images"] if i["status"] == 200]
    assert len(answered) == profile.data.n_images == 80
    p = np.array([i["p_served"] for i in answered])
    np.testing.assert_allclose(profile.apply(p), [i["p_site"] for i in answered], rtol=1e-12)
    # the contract's one decision rule, at the site's threshold on the site's probabilities
    meta = load_metadata(SHIPPED_METADATA)
    called = [i["site_call"] for i in answered]
    assert called == [
        meta.label_at_threshold(np.array([1.0 - v, v]), profile.operating.threshold)
        for v in profile.apply(p)
    ]
    # 40 of each class: enough for the two-parameter fit
    assert profile.recalibration.method == "platt"
    site = results["figures"]["at_site_threshold"]
    assert site["in_sample"]["sensitivity"] >= profile.operating.target_sensitivity
    assert "cross_validated" in site and results["figures"]["cross_validation"]["folds"] == 5


def test_subgroups_come_from_folders_and_file_names(kaggle_run: dict[str, Any]) -> None:
    subgroups = kaggle_run["results"]["figures"]["subgroups"]
    assert {row["value"]: row["images"] for row in subgroups["folder"]} == {"ward-b": 20}
    assert {row["value"] for row in subgroups["subtype"]} <= {"bacteria", "virus"}


def test_split_half_profile_is_checked_on_the_other_half(kaggle_run: dict[str, Any]) -> None:
    split = kaggle_run["results"]["split_half"]
    half_profile = site_profile.load(kaggle_run["out"] / "split_half" / "site_profile.json")
    assert half_profile.sha256 == split["profile"]["sha256"]
    assert split["fitted_on"]["images"] + split["held_out"]["images"] == 80
    assert [c["name"] for c in split["acceptance"]["checks"]] == [
        "ECE",
        "sensitivity",
        "specificity",
    ]
    assert split["repeats"]["n"] == 3


def test_report_is_one_self_contained_page(kaggle_run: dict[str, Any]) -> None:
    page = (kaggle_run["out"] / "report.html").read_text()
    urls = set(re.findall(r"(?:https?:)?//[^\s\"'<>)]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(?:script|link|img|iframe)\b", page)
    assert page.count("<svg") == 6
    assert "unsupported_media_type" in page and "Verdict" in page


def test_report_shows_its_pictures_in_an_offline_browser(
    browser: Any, kaggle_run: dict[str, Any], tmp_path: Path
) -> None:
    report = kaggle_run["out"] / "report.html"
    url = report.as_uri()
    context = browser.new_context()
    blocked: list[str] = []
    errors: list[str] = []

    def route(request_route: Any) -> None:
        if request_route.request.url == url:
            request_route.continue_()
        else:
            blocked.append(request_route.request.url)
            request_route.abort("internetdisconnected")

    context.route("**/*", route)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="load")
    boxes = page.eval_on_selector_all(
        "svg",
        "els => els.map(e => [e.id, e.getBoundingClientRect().width, "
        "e.getBoundingClientRect().height, e.querySelectorAll('*').length])",
    )
    assert {b[0] for b in boxes} == {
        "roc",
        "reliability",
        "confusion-shipped",
        "confusion-site",
        "histogram-served",
        "histogram-site",
    }
    for ident, width, height, elements in boxes:
        assert width > 200 and height > 200, ident
        assert elements > 10, ident  # drawn, not empty
    assert "Verdict" in page.inner_text("#verdict")
    screenshot = tmp_path / "site-report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"site report screenshot: {screenshot}")
    assert screenshot.stat().st_size > 50_000
    assert blocked == [] and errors == []
    context.close()


def _dicom_folder(root: Path) -> Path:
    """Real test X-rays as DICOM DX files with header subgroups and sentinel patient values, a CT
    the service must refuse, an unlabelled file, and labels.csv keyed by file or SOP UID."""
    data = root / "dicom-site"
    (data / "room-2").mkdir(parents=True)
    rows = []
    sources = [(p, "NORMAL") for p in _real("NORMAL", 18)]
    sources += [(p, "PNEUMONIA") for p in _real("PNEUMONIA", 18)]
    for i, (source, label) in enumerate(sources):
        grey = np.asarray(Image.open(source).convert("L"), dtype=np.uint8)
        uid = f"1.2.826.0.1.3680043.10.1001.{100 + i}"
        encoded = make_dicom(
            grey,
            view="AP" if i % 3 else "PA",
            patient_age="004Y" if i % 2 else "035Y",
            extra={
                "PatientID": f"{SENTINEL_ID}-{i // 2}",  # two images per patient
                "PatientName": SENTINEL_NAME,
                "PatientSex": "F" if i % 4 < 2 else "M",
                "Manufacturer": "Acme Medical" if i < 20 else "Other Imaging",
                "SOPInstanceUID": uid,
            },
        )
        name = f"room-2/img{i:03d}.dcm" if i % 5 == 0 else f"img{i:03d}.dcm"
        (data / name).write_bytes(encoded)
        rows.append(
            {
                "file": name if i % 2 else "",
                "sop_instance_uid": "" if i % 2 else uid,
                "label": label,
            }
        )
    ct = make_dicom(
        np.zeros((128, 128), np.uint16),
        modality="CT",
        sop_class=CT_STORAGE,
        extra={"PatientID": f"{SENTINEL_ID}-ct", "PatientName": SENTINEL_NAME},
    )
    (data / "head_ct.dcm").write_bytes(ct)
    rows.append({"file": "head_ct.dcm", "sop_instance_uid": "", "label": "NORMAL"})
    (data / "unlabelled.dcm").write_bytes(ct)
    with (data / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["file", "sop_instance_uid", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return data


@pytest.fixture(scope="module")
def shipped_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    workdir = tmp_path_factory.mktemp("site-service")
    settings = {
        "CXR_MODEL_METADATA": str(SHIPPED_METADATA),
        "CXR_PROVIDER": "cpu",
        "CXR_ORT_INTRA_OP_THREADS": "1",
        "CXR_DRAIN_SECONDS": "0",
    }
    with UvicornProcess.serving(workdir / "server.log", settings) as server:
        yield server


def test_dicom_folder_over_http(
    shipped_service: UvicornProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _dicom_folder(tmp_path)
    out = tmp_path / "out"
    code = main(
        [str(data), "--out", str(out), "--service", shipped_service.base_url, "--resamples", "200"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["kind"] == "dicom"
    assert results["served_by"] == f"the service at {shipped_service.base_url}"
    assert [(r["file"], r["error_code"]) for r in results["refused"]] == [
        ("head_ct.dcm", "not_intended_use")
    ]
    assert any("1 files without a row" in note for note in results["data"]["notes"])
    counts = results["figures"]["counts"]
    assert counts["images"] == 36 and counts["patients"] == 18  # PatientID pairs the images
    subgroups = results["figures"]["subgroups"]
    assert {r["value"]: r["images"] for r in subgroups["manufacturer"]} == {
        "ACME MEDICAL": 20,
        "OTHER IMAGING": 16,
    }
    assert {r["value"] for r in subgroups["view position"]} == {"AP", "PA"}
    assert {r["value"]: r["images"] for r in subgroups["age band"]} == {"1-5": 18, "18-64": 18}
    assert {r["value"] for r in subgroups["sex"]} == {"female", "male"}
    assert {r["value"]: r["images"] for r in subgroups["folder"]} == {"room-2": 8}
    profile = site_profile.load(out / "site_profile.json")
    # 18 of each class: too few for two parameters, so a temperature, and the file says why
    assert profile.recalibration.method == "temperature"
    assert "fewer than the 30" in profile.recalibration.reason
    assert profile.recalibration.intercept == 0.0
    # no patient value anywhere in what the tool wrote or printed
    captured = capsys.readouterr()
    for text in [
        *(p.read_text() for p in out.rglob("*") if p.is_file()),
        captured.out,
        captured.err,
        shipped_service.log(),
    ]:
        assert SENTINEL_ID not in text and "Sentinelname" not in text
