"""The SR as a reader sees it: DCMTK's dsr2html (much like the text pane of many PACS) shows the
result in words, the probability and threshold, what an outlined region is, the research-use
disclaimer and every warning of the answer; Procedure Reported names a chest radiograph; the
Referenced Request Sequence carries the source's accession number and requested procedure; and
PixelMed's SR validator finds no error in the structure (Debian `pixelmed-apps`)."""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from app.pacs.objects import REGION_MEANING, ResultFacts, build_sr, encode, summary_text
from tests.app.pacs.pacs_results import DISCLAIMER, factory_source, load_source, make_facts
from tests.app.pacs.pacs_servers import require_tool

# What the service says for the real adult Philips CR (app.imaging.dicom.gate.age_warning).
AGE_WARNING = (
    "the patient's age is outside the training population (paediatric patients aged 1 to 5 "
    "years); the model's accuracy for this patient is unknown"
)
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# PixelMed 20220618 reports any code outside a context group as an error, also for a Baseline
# group (its checkCodeIsInContextGroup ignores the B/D/E flag): TID 1500 row 4 is BCID 100, whose
# codes are CT, MR, NM and PET procedures only, so a chest radiograph cannot be named without it.
PIXELMED_BASELINE_CID_100 = re.compile(
    r"^Error: Template 1500 MeasurementReport/\[Row 1\] CONTAINER CID 7021/\[Row 4\] CODE "
    r"\(121058,DCM,\"Procedure reported\"\).*Code \(399208008,SCT,\"Plain chest X-ray\"\) not "
    r"found in context group 100$"
)


def _requested(source: Dataset) -> Dataset:
    source.AccessionNumber = "ACC-20260101-7"
    request = Dataset()
    request.RequestedProcedureID = "RP-4711"
    request.RequestedProcedureDescription = "XR CHEST PA"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "36554-4", "LN"
    code.CodeMeaning = "XR Chest Single view"
    request.RequestedProcedureCodeSequence = [code]
    request.ScheduledProcedureStepID = "SPS-1"
    source.RequestAttributesSequence = [request]
    return source


def _dsr2html(ds: Dataset, tmp_path: Path) -> str:
    dsr2html = require_tool("dsr2html", "dcmtk")
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(ds))
    run = subprocess.run([dsr2html, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", run.stdout)))


def test_dsr2html_shows_the_result_in_words_the_disclaimer_and_every_warning(
    tmp_path: Path,
) -> None:
    facts = make_facts(warnings=(AGE_WARNING, "another caveat of the answer"))
    text = _dsr2html(build_sr(_requested(load_source("rg1_cr")), facts), tmp_path)
    assert (
        "Pneumonia: likely at the model's operating point (probability 0.873, threshold 0.430)"
        in text
    )
    assert f"Outlined region: {REGION_MEANING}" in text
    assert DISCLAIMER in text
    assert f"Warning: {AGE_WARNING}" in text
    assert "Warning: another caveat of the answer" in text
    assert "Plain chest X-ray" in text
    assert "Present" in text
    # the figures themselves, and the attention group named for what it is
    assert "0.8731" in text and "0.43" in text
    assert "class activation map peak (attention, not a detection)" in text


def test_a_negative_answer_reads_unlikely_and_shows_no_region(tmp_path: Path) -> None:
    facts = make_facts(probability=0.2113)
    assert facts.cam_grid is not None and not facts.positive
    text = _dsr2html(build_sr(factory_source(), facts), tmp_path)
    assert "Pneumonia: unlikely at the model's operating point" in text
    assert "Absent" in text
    assert "Outlined region" not in text and "Polyline" in text  # the whole image only
    assert "attention" not in text
    assert DISCLAIMER in text


def test_the_summary_names_the_site_operating_point_when_a_profile_set_it() -> None:
    profiled = make_facts(site_profile_sha256="5e" * 32)
    assert summary_text(profiled).startswith("Pneumonia: likely at the site's operating point")
    assert summary_text(make_facts()).startswith("Pneumonia: likely at the model's operating")


def test_the_answer_warnings_reach_the_facts() -> None:
    answer = {
        "label": "NORMAL",
        "probabilities": {"NORMAL": 0.9, "PNEUMONIA": 0.1},
        "threshold": 0.43,
        "model": {"name": "m", "version": "1", "sha256": "ab" * 32},
        "disclaimer": DISCLAIMER,
        "warnings": [AGE_WARNING],
    }
    assert ResultFacts.from_answer(answer, "PNEUMONIA").warnings == (AGE_WARNING,)
    assert ResultFacts.from_answer({**answer, "warnings": []}, "PNEUMONIA").warnings == ()


def test_procedure_reported_and_the_referenced_request() -> None:
    source = _requested(factory_source(index=52))
    sr = build_sr(source, make_facts())
    procedure = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert [
        (p.ConceptCodeSequence[0].CodeValue, p.ConceptCodeSequence[0].CodingSchemeDesignator)
        for p in procedure
    ] == [("399208008", "SCT")]
    (request,) = sr.ReferencedRequestSequence
    assert request.StudyInstanceUID == source.StudyInstanceUID
    assert request.AccessionNumber == "ACC-20260101-7"
    assert request.RequestedProcedureID == "RP-4711"
    assert request.RequestedProcedureDescription == "XR CHEST PA"
    assert request.RequestedProcedureCodeSequence[0].CodeValue == "36554-4"
    # Type 2 attributes present, empty where the source has no value
    assert request.PlacerOrderNumberImagingServiceRequest == ""
    assert request.FillerOrderNumberImagingServiceRequest == ""
    assert request.ReferencedStudySequence == []


def test_an_accession_number_alone_makes_a_request_and_nothing_makes_none() -> None:
    source = factory_source(index=53)  # AccessionNumber ACC-1, no request attributes
    (request,) = build_sr(source, make_facts()).ReferencedRequestSequence
    assert (request.AccessionNumber, request.RequestedProcedureID) == ("ACC-1", "")
    source.AccessionNumber = ""
    assert "ReferencedRequestSequence" not in build_sr(source, make_facts())


def pixelmed_output(path: Path, validator: str = "DicomSRValidator") -> str:
    """What PixelMed's `validator` (com.pixelmed.validate.<validator>) prints for `path`."""
    java = require_tool("java", "default-jre-headless")
    require_tool(PIXELMED_JAR, "pixelmed-apps")
    run = subprocess.run(
        [
            java,
            # its XPath expressions exceed the JDK's default limits
            "-Djdk.xml.xpathExprOpLimit=0",
            "-Djdk.xml.xpathExprGrpLimit=0",
            "-Djdk.xml.xpathTotalOpLimit=0",
            "-cp",
            str(PIXELMED_JAR),
            f"com.pixelmed.validate.{validator}",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return run.stdout + run.stderr


def _pixelmed(path: Path) -> list[str]:
    output = pixelmed_output(path)
    assert "IOD validation complete" in output, output[-2000:]
    return [line for line in output.splitlines() if line.startswith(("Error", "Warning"))]


@pytest.mark.parametrize("probability", [0.8731, 0.2113], ids=["positive-region", "negative"])
def test_pixelmed_finds_no_error_in_the_sr(probability: float, tmp_path: Path) -> None:
    facts = make_facts(probability=probability, warnings=(AGE_WARNING,))
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(build_sr(_requested(load_source("rg1_cr")), facts)))
    lines = _pixelmed(path)
    errors = [
        line
        for line in lines
        if line.startswith("Error") and not PIXELMED_BASELINE_CID_100.match(line)
    ]
    assert errors == []
    # the one warning: the Comment inside a measurement group, which TID 1501 does not list and
    # OHIF needs to show the verdict beside the numbers (one per group)
    warnings = [line for line in lines if line.startswith("Warning")]
    assert all('TEXT (121106,DCM,"Comment"): Content Item not in template' in w for w in warnings)
    assert len(warnings) == (2 if probability > 0.5 else 1)
