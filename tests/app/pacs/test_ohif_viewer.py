"""Every kind of result object opens in the OHIF Viewer, as a radiologist would open it.

OHIF 3.13 (npm `@ohif/app`, installed by `scripts/install-ohif.sh`) against a real Orthanc's
DICOMweb, through a same-origin proxy (`ohif_harness`), in headless Chromium (Debian's, driven by
Playwright as in the /docs test). Four studies, each with the objects the service writes for it,
built here (`app.pacs.objects`, `app.pacs.gsps`) and stored into Orthanc: an SR of a positive
answer with the attention region, the heat-map SC and the GSPS, an SR of a negative answer, an SR
of a positive answer without a class activation map, and a study of two frontal images with its
study-level SR. Then two studies whose results the running service itself made and delivered
(`service_studies`: a uvicorn process on the tiny model with class activation maps and the
heat-map setting, which reads RG1 as positive): one pushed to its DICOM listener by Orthanc's
C-STORE, one sent with `POST /predict?deliver=true`, each opened once its SR, heat map and GSPS
are in Orthanc. Each study is opened, each series double-clicked into the
viewport; the test fails on any page error or OHIF error boundary ("Something went wrong", as
every SR caused before OHIF/Viewers#3390 was worked around). An image must be rendered in the
viewport; an SR must be loaded by OHIF with every measurement group placed on its image, and its
verdict and probability drawn there (`ohif_harness.wait_for_sr_labels`, which also says why it
may have to ask for one render). The heat map's verdict is burned into its pixels (tested in
`test_pacs_objects`); here it must open and render. OHIF 3.13.2 does not display presentation
states: the GSPS must be listed, and opening it must leave the image shown, with no error.

Skips without OHIF or Chromium, saying which; `.ci/run` installs both and sets
CXR_REQUIRE_OHIF=1 and CXR_REQUIRE_BROWSER=1, which make that a failure; without pydicom-data
(RG1) it skips, saying so. One Orthanc, one browser, six studies: a minute or two. With
CXR_OHIF_SCREENSHOTS=<dir> it saves a screenshot of each result object of the first four studies
there (docs/figures/ holds them).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from app.pacs.gsps import GSPS_SERIES_DESCRIPTION, build_gsps
from app.pacs.objects import (
    SetAsideImage,
    StudyImage,
    build_heatmap_sc,
    build_sr,
    build_study_sr,
    encode,
)
from tests.app.pacs.ohif_harness import (
    installed_ohif,
    ohif_viewer,
    wait_for_image,
    wait_for_listed,
    wait_for_sr_labels,
)
from tests.app.pacs.pacs_results import factory_source, grey_u8, make_facts, rg1_path
from tests.app.pacs.pacs_servers import Orthanc, orthanc_server
from tests.app.pacs.service_studies import (
    ServiceResult,
    push_by_c_store,
    send_with_deliver,
    start_heatmap_service,
    wait_for_delivered,
)
from tests.app.pacs.test_pacs_service import Loop
from tests.support.offline_browser import open_offline

ERROR_BOUNDARY = "Something went wrong"
RENDER_TIMEOUT_MS = 60_000  # OHIF starts slowly on a loaded 2-core machine (30 s ran out once)
UID_ROOT = "1.2.826.0.1.3680043.10.1001."  # as the test factory's sources (pacs_results)
ROUTES = ("c-store", "deliver")  # how the service got the image of each of its studies


@dataclass(frozen=True)
class Series:
    """One series of a study as the test expects to see it in the viewer."""

    name: str  # the screenshot's name
    modality: str  # as OHIF's display set has it
    description: str  # Series Description, as OHIF lists it in the study browser
    expected_text: tuple[str, ...]  # an SR's labels that must be drawn on its image


@dataclass(frozen=True)
class Study:
    uid: str
    series: tuple[Series, ...]
    screenshots: bool = True  # with CXR_OHIF_SCREENSHOTS, of its SRs and heat map


def _chest_source(index: int | None = None) -> Dataset:
    """RG1, the real CR chest PA of pydicom-data, with its Pixel Spacing of 0\\0 removed (OHIF
    draws a CR with that test-data defect black); with `index`, in a study of its own (its own
    study, series and SOP Instance UIDs)."""
    ds = pydicom.dcmread(rg1_path())
    if "PixelSpacing" in ds:
        del ds.PixelSpacing
    if index is not None:
        ds.StudyInstanceUID = f"{UID_ROOT}1.{index}"
        ds.SeriesInstanceUID = f"{UID_ROOT}2.{index}"
        ds.SOPInstanceUID = f"{UID_ROOT}3.{index}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _store(orthanc: Orthanc, *objects: Dataset) -> None:
    for ds in objects:
        httpx.post(f"{orthanc.url}/instances", content=encode(ds), timeout=60.0).raise_for_status()


def _sr_series(name: str, verdict: str, probability: str, *more: str) -> Series:
    return Series(name, "SR", "AI RESULT - RESEARCH USE ONLY", (verdict, probability, *more))


@pytest.fixture(scope="module")
def studies(orthanc: Orthanc) -> list[Study]:
    """The three studies in Orthanc: source image and result objects of each."""
    rg1 = _chest_source()
    positive = make_facts()
    _store(
        orthanc,
        rg1,
        build_sr(rg1, positive),
        build_heatmap_sc(rg1, positive, grey_u8()),
        build_gsps(rg1, positive, None),
    )
    negative_source = factory_source(index=61)
    _store(orthanc, negative_source, build_sr(negative_source, make_facts(probability=0.2113)))
    plain_source = factory_source(index=62)
    _store(orthanc, plain_source, build_sr(plain_source, make_facts(cam_grid=None)))
    # a study of two frontal images (the second the more positive) and a lateral set aside
    first, second = factory_source(index=63), factory_source(index=64)
    second.StudyInstanceUID, second.SeriesInstanceUID = (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
    )
    study_sr = build_study_sr(
        [
            StudyImage(first, make_facts(probability=0.2113, cam_grid=None)),
            StudyImage(second, make_facts()),
        ],
        [SetAsideImage("1.2.826.0.1.3680043.10.1001.3.65", "View Position LL is a lateral view")],
        "0" * 64,
    )
    _store(orthanc, first, second, study_sr)
    source_series = Series("source", "CR", "", ())
    return [
        Study(
            str(rg1.StudyInstanceUID),
            (
                source_series,
                _sr_series(
                    "sr-positive-region",
                    "Pneumonia likely",
                    "Probability: 0.87",
                    "Attention map peak, not a detection",
                ),
                Series("heatmap-sc", "OT", "AI HEAT MAP - RESEARCH USE ONLY", ()),
                # OHIF 3.13.2 lists a presentation state as a series it cannot display (its
                # thumbnail has a warning sign) and leaves the viewport as it was when it is opened
                Series("gsps", "PR", GSPS_SERIES_DESCRIPTION, ()),
            ),
        ),
        Study(
            str(negative_source.StudyInstanceUID),
            (source_series, _sr_series("sr-negative", "Pneumonia unlikely", "Probability: 0.21")),
        ),
        Study(
            str(plain_source.StudyInstanceUID),
            (source_series, _sr_series("sr-positive", "Pneumonia likely", "Probability: 0.87")),
        ),
        Study(
            str(first.StudyInstanceUID),
            (
                source_series,
                Series(
                    "sr-study",
                    "SR",
                    "AI STUDY RESULT - RESEARCH USE ONLY",
                    ("Image 2: pneumonia likely", "Probability: 0.87"),
                ),
            ),
        ),
    ]


@pytest.fixture(scope="module")
def wiring(tmp_path_factory: pytest.TempPathFactory) -> Loop:
    """The service's ports and settings, which Orthanc needs to know before it starts."""
    return Loop(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def orthanc(wiring: Loop) -> Iterator[Orthanc]:
    """One Orthanc for the module, knowing the service as its DICOM modality `cxr`."""
    with orthanc_server(wiring.workdir / "orthanc", extra=wiring.orthanc_extra) as server:
        yield server


def _service_study(route: str, source: Dataset, result: ServiceResult) -> Study:
    """The series of a study the service read, as OHIF lists them (as in `studies`)."""
    assert set(result.objects) == {"sr", "sc", "gsps"}, (
        f"{route}: the CAM model reads RG1 as positive, which gets an SR, a heat map and a GSPS",
        result,
    )
    probability = float(result.answer["probabilities"]["PNEUMONIA"])
    verdict = "likely" if result.answer["label"] == "PNEUMONIA" else "unlikely"
    return Study(
        str(source.StudyInstanceUID),
        (
            Series(f"{route}-source", "CR", "", ()),
            _sr_series(
                f"{route}-sr",
                f"Pneumonia {verdict}",
                f"Probability: {probability:.2f}",
                "Attention map peak, not a detection",
            ),
            Series(f"{route}-heatmap-sc", "OT", "AI HEAT MAP - RESEARCH USE ONLY", ()),
            Series(f"{route}-gsps", "PR", GSPS_SERIES_DESCRIPTION, ()),
        ),
        screenshots=False,
    )


@pytest.fixture(scope="module")
def service_studies(wiring: Loop, orthanc: Orthanc) -> list[Study]:
    """Two studies of RG1 whose results the running service made and delivered to Orthanc: one
    pushed to its DICOM listener by Orthanc's C-STORE, one sent with `POST /predict?deliver=true`
    (its image stored in Orthanc as the modality's would be)."""
    pushed, sent = _chest_source(index=71), _chest_source(index=72)
    server = start_heatmap_service(wiring, orthanc)
    try:
        push_by_c_store(orthanc, encode(pushed))
        _store(orthanc, sent)
        send_with_deliver(server, encode(sent))
        results = [
            wait_for_delivered(orthanc, server, str(source.SOPInstanceUID))
            for source in (pushed, sent)
        ]
    finally:
        server.kill()  # OHIF reads Orthanc only
    return [
        _service_study(route, source, result)
        for route, source, result in zip(ROUTES, (pushed, sent), results, strict=True)
    ]


@pytest.fixture(scope="module")
def viewer(orthanc: Orthanc) -> Iterator[str]:
    dist = installed_ohif()
    with ohif_viewer(dist, orthanc.http_port) as origin:
        yield origin


def _screenshot(page: Any, name: str) -> None:
    folder = os.environ.get("CXR_OHIF_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(page.screenshot())) as shot:
        # small files for the record: a 64-colour palette
        shot.convert("RGB").quantize(64).save(Path(folder) / f"ohif-{name}.png", optimize=True)


def _dismiss_tour(page: Any) -> None:
    skip = page.get_by_text("Skip all")
    try:
        skip.first.wait_for(timeout=5_000)
    except Exception:  # no tour this time
        return
    skip.first.click()


def _thumbnail(thumbnails: Any, series: Series) -> Any:
    """The series' thumbnail in the study browser, found by what it reads: the modality, the
    Series Description (none for the source), "S:" and the series number, the instance count.
    OHIF does not always list a study's series in the same order (a PR was seen before its SR)."""
    texts = [thumbnails.nth(i).inner_text().splitlines() for i in range(thumbnails.count())]
    described = [series.description] if series.description else []
    for index, lines in enumerate(texts):
        if lines[:1] == [series.modality] and lines[1:-2] == described:
            return thumbnails.nth(index)
    raise AssertionError(f"{series} not listed in the study browser: {texts}")


def _open_in_ohif(browser: Any, viewer: str, studies: list[Study]) -> list[str]:
    """Open each study and double-click each of its series into the viewport, checking each as
    the module docstring says; the names of the series seen."""
    offline = open_offline(browser, viewer)
    page = offline.page
    page.set_viewport_size({"width": 1440, "height": 720})
    console_errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
    seen: list[str] = []
    renders_asked: dict[str, int] = {}
    for study in studies:
        page.goto(f"{viewer}/viewer?StudyInstanceUIDs={study.uid}", wait_until="load")
        # an image's thumbnail, or an SR's or PR's without one
        thumbnails = page.locator("[data-cy^='study-browser-thumbnail']")
        thumbnails.nth(len(study.series) - 1).wait_for(timeout=RENDER_TIMEOUT_MS)
        _dismiss_tour(page)
        shown: Series | None = None  # the image series in the viewport
        for series in study.series:
            _thumbnail(thumbnails, series).dblclick()
            if series.modality == "SR":
                asked = wait_for_sr_labels(page, series.expected_text, RENDER_TIMEOUT_MS)
                renders_asked[series.name] = asked
            elif series.modality == "PR":
                wait_for_listed(page, series.modality, series.description, RENDER_TIMEOUT_MS)
                page.wait_for_timeout(2_000)  # nothing to wait for: OHIF does not display it
                assert shown is not None
                wait_for_image(page, shown.modality, shown.description, RENDER_TIMEOUT_MS)
            else:
                wait_for_image(page, series.modality, series.description, RENDER_TIMEOUT_MS)
                shown = series
            body = page.inner_text("body")
            assert ERROR_BOUNDARY not in body, (series.name, offline.page_errors, console_errors)
            assert offline.page_errors == [], (series.name, console_errors)
            if study.screenshots and series.modality in ("SR", "OT"):  # those OHIF displays
                page.wait_for_timeout(500)  # the canvas composited, for the screenshot only
                _screenshot(page, series.name)
            seen.append(series.name)
    # how often OHIF left the labels undrawn until a render was asked for (ohif_harness.py)
    print("renders asked for per SR:", renders_asked)
    assert offline.blocked == []
    return seen


def test_every_result_object_opens_in_ohif(browser: Any, viewer: str, studies: list[Study]) -> None:
    seen = _open_in_ohif(browser, viewer, studies)
    assert sorted(set(seen)) == [
        "gsps",
        "heatmap-sc",
        "source",
        "sr-negative",
        "sr-positive",
        "sr-positive-region",
        "sr-study",
    ]


def test_the_results_the_service_delivered_open_in_ohif(
    browser: Any, viewer: str, service_studies: list[Study]
) -> None:
    seen = _open_in_ohif(browser, viewer, service_studies)
    for route in ROUTES:
        assert {f"{route}-{kind}" for kind in ("source", "sr", "heatmap-sc", "gsps")} <= set(seen)
