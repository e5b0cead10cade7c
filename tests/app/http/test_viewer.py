"""The viewer page in a real browser: headless Chromium, no network beyond the service, the shipped
model on a real uvicorn process, a real test X-ray (and the same X-ray as DICOM) chosen in the page.
A screenshot of each rendered answer is written next to the server log and its path printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.testing.dicom_files import make_dicom
from tests.support.offline_browser import open_offline
from tests.support.realdata import DATA_DIR, SHIPPED_METADATA, requires_data, requires_shipped_model
from tests.support.testkit import UvicornProcess

pytestmark = [requires_data, requires_shipped_model]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    workdir = tmp_path_factory.mktemp("viewer")
    settings = {
        "CXR_MODEL_METADATA": str(SHIPPED_METADATA),
        "CXR_PROVIDER": "cpu",
        "CXR_ORT_INTRA_OP_THREADS": "1",
        "CXR_DRAIN_SECONDS": "0",
    }
    with UvicornProcess.serving(workdir / "server.log", settings) as server:
        yield server


def _answer_for(service: UvicornProcess, data: bytes, content_type: str) -> dict:
    response = httpx.post(
        f"{service.base_url}/predict", content=data, headers={"content-type": content_type}
    )
    response.raise_for_status()
    return dict(response.json())


def _choose_and_wait(page, path: Path) -> None:  # type: ignore[no-untyped-def]
    page.set_input_files("#file", str(path))
    page.wait_for_selector("body[data-state=answered]", timeout=30_000)


def test_a_test_x_ray_is_answered_with_its_heat_map(browser, service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    expected = _answer_for(service, source.read_bytes(), "image/jpeg")

    offline = open_offline(browser, service.base_url)
    page = offline.page
    page.goto(f"{service.base_url}/", wait_until="load")  # the home page redirects here
    assert page.url.endswith("/viewer")
    # A locator wait, not wait_for_function: a string predicate is evaluated with eval(), which
    # the page's CSP (rightly) refuses whenever the first check is not already true.
    version = json.loads(SHIPPED_METADATA.read_text())["version"]
    page.locator("#model", has_text=version).wait_for(timeout=20_000)
    assert "pneumonia_cxr" in page.inner_text("#model")
    _choose_and_wait(page, source)

    assert page.inner_text("#label") == expected["label"]
    shown = page.inner_text("#probabilities")
    assert f"{100 * expected['probabilities']['PNEUMONIA']:.1f}%" in shown
    assert page.inner_text("#threshold") == f"{expected['threshold']:.3f}"
    assert "Research use only" in page.inner_text("#disclaimer")
    assert "Class activation map for" in page.inner_text("#explained")
    # both pictures decoded at the model input's size
    for image in ("#image", "#heatmap"):
        assert page.eval_on_selector(image, "img => img.complete && img.naturalWidth") == 224
    # the slider drives the heat map's opacity
    page.fill("#opacity", "0.8")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#heatmap", "img => img.style.opacity") == "0.8"

    screenshot = service.log_path.parent / "viewer-jpeg.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"viewer screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert offline.blocked == [] and offline.page_errors == [] and offline.csp_refusals == []


def test_the_same_x_ray_as_dicom_shows_its_header_facts(browser, service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    pixels = np.asarray(Image.open(source).convert("L")).astype(np.uint16) * 16 + 8
    dicom = tmp_path / "chest.dcm"
    dicom.write_bytes(make_dicom(pixels, "jpeg_ls", window=(2048.0, 4096.0), bits_stored=12))
    expected = _answer_for(service, dicom.read_bytes(), "application/dicom")

    offline = open_offline(browser, service.base_url)
    page = offline.page
    page.goto(f"{service.base_url}/viewer", wait_until="load")
    _choose_and_wait(page, dicom)
    assert page.inner_text("#label") == expected["label"]
    facts = page.inner_text("#dicom")
    assert "DX" in facts and expected["dicom"]["sop_instance_uid"] in facts
    screenshot = service.log_path.parent / "viewer-dicom.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"viewer screenshot: {screenshot}")
    assert offline.blocked == [] and offline.page_errors == []


def test_a_refused_upload_shows_the_reason(browser, service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page = open_offline(browser, service.base_url).page
    page.goto(f"{service.base_url}/viewer", wait_until="load")
    page.set_input_files("#file", str(text))
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "unsupported_media_type" in page.inner_text("#error")
    assert page.locator("#result").is_hidden()
