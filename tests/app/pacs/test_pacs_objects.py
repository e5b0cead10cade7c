"""The result objects: deterministic UIDs, the SR's content read back by highdicom and DCMTK, the
heat map's pixels, dciodvfy on every object built from every kind of source, and the same bytes
for the same reading whatever the clock says."""

from __future__ import annotations

import datetime
import io
import re
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from app.pacs.objects import (
    COMPREHENSIVE_3D_SR,
    NO_SOURCE_DATE,
    NO_SOURCE_TIME,
    SECONDARY_CAPTURE,
    ObjectTime,
    ResultFacts,
    build_heatmap_sc,
    build_sr,
    encode,
    render_heatmap,
    render_objects,
)
from app.pacs.outbox import ResultObject
from app.pacs.uids import device_uid, result_instance_uid, result_key, result_series_uid
from tests.app.pacs.pacs_results import (
    DISCLAIMER,
    MODEL_SHA256,
    assert_no_header_value_logged,
    factory_source,
    grey_u8,
    highdicom_clock_at,
    load_source,
    make_facts,
)
from tests.app.pacs.pacs_servers import require_tool

PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)


def test_result_uids_are_deterministic_distinct_and_valid() -> None:
    a = result_instance_uid("1.2.3.4", MODEL_SHA256, "sr")
    assert a == result_instance_uid("1.2.3.4", MODEL_SHA256, "sr")
    others = {
        result_instance_uid("1.2.3.5", MODEL_SHA256, "sr"),
        result_instance_uid("1.2.3.4", "0" * 64, "sr"),
        result_instance_uid("1.2.3.4", MODEL_SHA256, "sc"),
        result_series_uid("1.2.3.4", MODEL_SHA256, "sr"),
        device_uid(MODEL_SHA256),
    }
    assert a not in others and len(others) == 5
    for uid in (a, *others):
        assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) and len(uid) <= 64
        assert int(uid[5:]) < 2**128
    with pytest.raises(ValueError):
        result_instance_uid("1.2.03", MODEL_SHA256, "sr")
    with pytest.raises(ValueError):
        result_instance_uid("1.2.3", "ABC", "sr")


def _roundtrip(ds: Dataset, path: Path) -> Path:
    path.write_bytes(encode(ds))
    return path


def test_sr_renders_the_answer_in_the_source_study(source: Dataset, tmp_path: Path) -> None:
    facts = make_facts()
    sr_path = _roundtrip(build_sr(source, facts), tmp_path / "sr.dcm")
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.Modality == "SR"
    assert "RESEARCH USE ONLY" in sr.SeriesDescription
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == result_instance_uid(source.SOPInstanceUID, MODEL_SHA256, "sr")
    for keyword in PATIENT_STUDY:
        assert sr.get(keyword, "") == source.get(keyword, ""), keyword
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    algorithms = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(algorithms) == 1
    equipment = algorithms[0]
    assert equipment.DeviceUID == device_uid(MODEL_SHA256)
    assert equipment.SoftwareVersions == facts.model_version
    assert equipment.ContributionDescription == DISCLAIMER

    doc = hd.sr.srread(sr_path)
    groups = doc.content.get_image_measurement_groups()
    # the classification, and (a Present finding with a CAM) the attention map's peak
    assert len(groups) == 2
    group = groups[0]
    assert str(group.tracking_identifier) == "pneumonia classification"
    assert group.finding_type.value == "233604007" and group.finding_type.scheme_designator == "SCT"
    probability = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.Probability)[0]
    assert probability.value == pytest.approx(facts.positive_probability, abs=1e-6)
    threshold = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.ThresholdValue)[0]
    assert threshold.value == pytest.approx(facts.threshold, abs=1e-6)
    assert _verdict(sr) == "121053"  # Present
    texts = {
        item.ConceptNameCodeSequence[0].CodeValue: str(item.TextValue)
        for item in group[0].ContentSequence
        if "TextValue" in item
    }
    # Algorithm Name, Version and Parameters (the model's sha256), and the Comment OHIF shows
    assert texts["111001"] == facts.model_name
    assert texts["111003"] == facts.model_version
    assert MODEL_SHA256 in texts["111002"]
    assert texts["121106"] == "Pneumonia likely"
    source_ref = group.source_images[0].referenced_sop_instance_uid
    assert source_ref == source.SOPInstanceUID
    # every group carries a coordinate on the source (OHIF's SR loader needs one, #3390): the
    # probability is inferred from the whole image, the attention area from the hottest cell
    whole, peak = (_inferred_outline(g[0]) for g in groups)
    right, bottom = source.Columns - 1.0, source.Rows - 1.0
    assert whole == [0.0, 0.0, right, 0.0, right, bottom, 0.0, bottom, 0.0, 0.0]
    assert len(peak) == 10 and peak != whole
    assert "not a detection" in str(groups[1].tracking_identifier)
    # no TID 1410 group: PixelMed would apply TID 1410 to every group of the report
    assert doc.content.get_planar_roi_measurement_groups() == []
    # Image Library entry for the source
    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1


def _verdict(sr: Dataset) -> str:
    """The code of Pneumonia's value in the report's Qualitative Evaluations (TID 1500 row 12)."""
    (container,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    (item,) = [
        i
        for i in container.ContentSequence
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "233604007"
    ]
    return str(item.ConceptCodeSequence[0].CodeValue)


def _report_texts(sr: Dataset) -> list[str]:
    (container,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    return [str(i.TextValue) for i in container.ContentSequence if i.ValueType == "TEXT"]


def _inferred_outline(group: Dataset) -> list[float]:
    """The graphic data of the SCOORD a group's first NUM is inferred from."""
    (num,) = [i for i in group.ContentSequence if i.ValueType == "NUM"][:1]
    (scoord,) = [i for i in num.ContentSequence if i.ValueType == "SCOORD"]
    assert scoord.RelationshipType == "INFERRED FROM"
    return [float(v) for v in scoord.GraphicData]


def test_sr_codes_absent_below_the_threshold(tmp_path: Path) -> None:
    facts = make_facts(probability=0.2113, threshold=0.43)
    assert facts.label == "NORMAL"
    sr_path = _roundtrip(build_sr(factory_source(), facts), tmp_path / "sr.dcm")
    assert _verdict(pydicom.dcmread(sr_path)) == "121054"  # Absent
    doc = hd.sr.srread(sr_path)
    # the attention map is drawn beside a Present finding only (facts carry a CAM grid)
    (group,) = doc.content.get_image_measurement_groups()
    assert _report_texts(pydicom.dcmread(sr_path))[0].startswith("Pneumonia: unlikely at")
    probability = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.Probability)[0]
    assert probability.value == pytest.approx(0.2113, abs=1e-6)


def test_rebuilding_gives_the_same_uids_and_another_model_new_ones() -> None:
    source = factory_source()
    first, again = build_sr(source, make_facts()), build_sr(source, make_facts(probability=0.9))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    other = build_sr(source, make_facts(model_sha256="1" * 64))
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID


SITE_PROFILE_SHA256 = "5e" * 32


def test_a_site_profile_gives_its_own_uids_and_no_profile_the_ones_before_profiles() -> None:
    """One UID must never name two findings: the same image read under a site profile (its own
    recalibration and threshold) is another result, with UIDs of its own; without one the UIDs
    are those that this service gave before site profiles existed (values from that code)."""
    model = "ab" * 32
    assert result_instance_uid("1.2.3.4", model, "sr") == (
        "2.25.185245719377280947019089540730340853181"
    )
    assert result_series_uid("1.2.3.4", model, "sc") == (
        "2.25.312292599420082954757899125495686386433"
    )
    assert result_key("1.2.3.4", model) == f"1.2.3.4/{model}"
    for make in (result_instance_uid, result_series_uid):
        plain = make("1.2.3.4", model, "sr")
        assert make("1.2.3.4", model, "sr", None) == plain
        profiled = make("1.2.3.4", model, "sr", SITE_PROFILE_SHA256)
        other = make("1.2.3.4", model, "sr", "7f" * 32)
        assert len({plain, profiled, other}) == 3
        assert make("1.2.3.4", model, "sr", SITE_PROFILE_SHA256) == profiled
        assert re.fullmatch(r"2\.25\.[1-9][0-9]*", profiled) and len(profiled) <= 64
    assert result_key("1.2.3.4", model, SITE_PROFILE_SHA256) != result_key("1.2.3.4", model)
    with pytest.raises(ValueError):
        result_instance_uid("1.2.3.4", model, "sr", "not-a-digest")


def test_an_answer_under_a_site_profile_renders_objects_of_that_reading() -> None:
    profiled = {**ANSWER, "calibration": {"profile": "st-mary", "sha256": SITE_PROFILE_SHA256}}
    facts = ResultFacts.from_answer(profiled, positive_class="PNEUMONIA")
    assert facts.site_profile_sha256 == SITE_PROFILE_SHA256
    assert ResultFacts.from_answer(ANSWER, positive_class="PNEUMONIA").site_profile_sha256 is None
    source = factory_source(index=41)
    sr, sc = (
        pydicom.dcmread(io.BytesIO(o.payload)) for o in render_objects(source, facts, grey_u8())
    )
    plain_sr = build_sr(source, ResultFacts.from_answer(ANSWER, positive_class="PNEUMONIA"))
    uid = source.SOPInstanceUID
    assert sr.SOPInstanceUID == result_instance_uid(uid, MODEL_SHA256, "sr", SITE_PROFILE_SHA256)
    assert sr.SeriesInstanceUID == result_series_uid(uid, MODEL_SHA256, "sr", SITE_PROFILE_SHA256)
    assert sc.SOPInstanceUID == result_instance_uid(uid, MODEL_SHA256, "sc", SITE_PROFILE_SHA256)
    assert sr.SOPInstanceUID != plain_sr.SOPInstanceUID
    # ... and the SR says which profile it was: an Algorithm Parameters value beside the model's
    parameters = [
        item.TextValue
        for item in _all_content_items(sr)
        if getattr(item, "ConceptNameCodeSequence", None)
        and item.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert f"site profile sha256={SITE_PROFILE_SHA256}" in parameters
    assert f"onnx sha256={MODEL_SHA256}" in parameters


def _all_content_items(ds: Dataset) -> list[Dataset]:
    found = []
    for item in getattr(ds, "ContentSequence", []):
        found.append(item)
        found.extend(_all_content_items(item))
    return found


def test_facts_refuse_an_inconsistent_answer() -> None:
    with pytest.raises(ValueError):
        make_facts(positive_class="COVID")
    with pytest.raises(ValueError):
        make_facts(cam_grid=[[float("nan")]])


def test_heatmap_sc_burns_the_map_legend_and_disclaimer(source: Dataset, tmp_path: Path) -> None:
    facts = make_facts()
    image = grey_u8()
    sc = pydicom.dcmread(_roundtrip(build_heatmap_sc(source, facts, image), tmp_path / "sc.dcm"))
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (
        source.SeriesInstanceUID,
        build_sr(source, facts).SeriesInstanceUID,
    )
    assert sc.SOPInstanceUID == result_instance_uid(source.SOPInstanceUID, MODEL_SHA256, "sc")
    for keyword in PATIENT_STUDY:
        assert sc.get(keyword, "") == source.get(keyword, ""), keyword
    pixels = sc.pixel_array
    # the image at its own size, the text in a band added below it
    assert pixels.shape[1:] == (image.shape[1], 3) and pixels.shape[0] > image.shape[0]
    assert (sc.Rows, sc.Columns) == pixels.shape[:2]
    # the hottest CAM cell (row 1, column 2 of 4x4) is red-dominant, the coldest blue-dominant
    hot = pixels[int(1.5 * 224 / 4), int(2.5 * 224 / 4)].astype(int)
    cold = pixels[int(3.5 * 224 / 4) - 40, int(0.5 * 224 / 4)].astype(int)
    assert hot[0] > hot[2] + 60, hot
    assert cold[2] > cold[0] + 30, cold
    # the stored pixels are exactly the rendering (no lossy step on the way)
    assert np.array_equal(render_heatmap(image, facts), pixels)


def test_heatmap_text_is_really_burned_in() -> None:
    facts = make_facts()
    with_text = render_heatmap(grey_u8(), facts)
    blank = render_heatmap(grey_u8(), make_facts(disclaimer="x"))
    bottom = slice(-40, None)
    # different disclaimer text changes the bottom band's pixels
    assert not np.array_equal(with_text[bottom], blank[bottom])
    # and the legend bar in the band below the image holds the whole colour ramp
    legend = with_text[224:, :, :].astype(int)
    assert (legend[..., 0] - legend[..., 2]).max() > 150
    assert (legend[..., 2] - legend[..., 0]).max() > 150


@pytest.mark.parametrize("kind", ["sr", "sr-enhanced", "sc", "sr-site-profile"])
def test_dciodvfy_reports_no_error(source: Dataset, kind: str, tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    facts = make_facts()
    if kind == "sr-site-profile":
        facts, kind = make_facts(site_profile_sha256=SITE_PROFILE_SHA256), "sr"
    if kind == "sc":
        built = build_heatmap_sc(source, facts, grey_u8())
    else:
        built = build_sr(
            source, facts, sr_class="enhanced" if kind == "sr-enhanced" else "comprehensive-3d"
        )
    path = _roundtrip(built, tmp_path / f"{kind}.dcm")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    expected_iod = {"sr": "Comprehensive3DSR", "sr-enhanced": "EnhancedSR", "sc": "SCImage"}[kind]
    assert expected_iod in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


def test_dsrdump_reads_the_sr(tmp_path: Path) -> None:
    dsrdump = require_tool("dsrdump", "dcmtk")
    source = load_source("rg1_cr")
    path = _roundtrip(build_sr(source, make_facts()), tmp_path / "sr.dcm")
    run = subprocess.run([dsrdump, "+Pc", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    tree = run.stdout
    assert "Comprehensive 3D SR Document" in tree
    assert '(233604007,SCT,"Pneumonia")' in tree
    assert '(121053,DCM,"Present")' in tree
    assert re.search(r'NUM:\(122157,DCM,"Probability"\)="0\.8731"', tree), tree
    assert re.search(r'NUM:\(122411,DCM,"Threshold Value"\)="0\.43"', tree), tree
    assert '(126000,DCM,"Imaging Measurement Report")' in tree
    assert "POLYLINE" in tree


ANSWER = {
    "label": "PNEUMONIA",
    "probabilities": {"NORMAL": 0.08, "PNEUMONIA": 0.92},
    "threshold": 0.43,
    "model": {"name": "pneumonia_cxr", "version": "1.0.0", "sha256": MODEL_SHA256},
    "execution_provider": "CPUExecutionProvider",
    "request_id": "0b9f6c1e2d7a4f0c9a8b7c6d5e4f3a2b",
    "disclaimer": DISCLAIMER,
    "explanation": {"method": "CAM", "target_class": "PNEUMONIA", "grid": [[0.0, 1.0], [0.5, 0.2]]},
}


def test_facts_from_a_predict_answer_and_the_objects_render_it(tmp_path: Path) -> None:
    facts = ResultFacts.from_answer(ANSWER, positive_class="PNEUMONIA")
    assert facts.positive and facts.positive_probability == 0.92 and facts.threshold == 0.43
    assert facts.cam_grid == [[0.0, 1.0], [0.5, 0.2]]
    assert (facts.model_name, facts.model_version, facts.model_sha256) == (
        "pneumonia_cxr",
        "1.0.0",
        MODEL_SHA256,
    )
    source = factory_source(index=40)
    objects = render_objects(source, facts, grey_u8())
    assert [o.kind for o in objects] == ["sr", "sc"]
    assert [o.sop_class_uid for o in objects] == [COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE]
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(objects[0].payload)
    group = hd.sr.srread(sr_path).content.get_image_measurement_groups()[0]
    probability = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.Probability)[0]
    assert probability.value == pytest.approx(0.92)
    # no explanation in the answer: the SR alone, and no heat map can be drawn
    plain = ResultFacts.from_answer({**ANSWER, "explanation": None}, positive_class="PNEUMONIA")
    assert plain.cam_grid is None
    assert [o.kind for o in render_objects(source, plain, grey_u8())] == ["sr"]
    with pytest.raises(ValueError):
        build_heatmap_sc(source, plain, grey_u8())


def test_building_logs_and_warns_nothing_from_the_header(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """highdicom quotes odd person names in warnings and source UIDs in INFO logs; neither may
    reach the service's logs (RG1's referring physician is the one-word name "ward")."""
    source = load_source("rg1_cr")
    caplog.set_level("DEBUG")
    for built in (
        build_sr(source, make_facts()),
        build_heatmap_sc(source, make_facts(), grey_u8()),
    ):
        assert built.ReferringPhysicianName == "ward"  # the real value is still copied
    assert_no_header_value_logged(source, caplog, recwarn)


def _written(objects: list[ResultObject], directory: Path) -> dict[str, bytes]:
    directory.mkdir()
    files = {}
    for obj in objects:
        path = directory / f"{obj.kind}.dcm"
        path.write_bytes(obj.payload)
        files[obj.kind] = path.read_bytes()
    return files


def _rendered(source: Dataset, facts: ResultFacts, directory: Path) -> dict[str, bytes]:
    """The SR (both classes) and the SC, written to files and read back."""
    objects = render_objects(source, facts, grey_u8())
    objects += render_objects(source, facts, sr_class="enhanced")
    return _written(objects, directory)


@pytest.mark.parametrize("probability", [0.8731, 0.12], ids=["positive", "negative"])
def test_the_same_reading_renders_the_same_bytes_across_a_clock_change(
    source: Dataset, probability: float, tmp_path: Path
) -> None:
    """Rendered under a clock on another day, then under the real clock past a second boundary:
    the written SR and SC files are identical byte for byte (highdicom alone would write the two
    clocks' dates and times, to the microsecond)."""
    facts = make_facts(probability=probability)
    with highdicom_clock_at(datetime.datetime(2031, 7, 4, 23, 59, 58, 123456)):
        first = _rendered(source, facts, tmp_path / "a")
    second_started = int(time.time())
    time.sleep(second_started + 1.05 - time.time())
    second = _rendered(source, facts, tmp_path / "b")
    assert int(time.time()) > second_started
    assert sorted(first) == sorted(second) == ["sc", "sr", "sr-enhanced"]
    for kind in first:
        assert first[kind] == second[kind], kind
    sr = pydicom.dcmread(tmp_path / "a" / "sr.dcm")
    assert _verdict(sr) == ("121053" if facts.positive else "121054")
    assert facts.positive == (probability > 0.5)


def _times(ds: Dataset) -> list[tuple[str, str]]:
    return [(e.keyword, str(e.value)) for e in ds.iterall() if e.VR in ("DA", "TM", "DT")]


def test_every_date_and_time_in_an_object_comes_from_the_source(source: Dataset) -> None:
    """Each DA, TM and DT is the source's own value (patient, study) or the object's time."""
    when = ObjectTime.of_source(source)
    own = {when.date, when.time, when.date_time}
    for ds in (build_sr(source, make_facts()), build_heatmap_sc(source, make_facts(), grey_u8())):
        stamped = {keyword for keyword, value in _times(ds) if keyword not in PATIENT_STUDY}
        assert stamped >= {"InstanceCreationDate", "ContentTime", "ContributionDateTime"}
        for keyword, value in _times(ds):
            if keyword in PATIENT_STUDY or keyword == "PatientBirthDate":
                assert value == str(source.get(keyword, "")), keyword
            else:
                assert value in own, keyword
        purposes = {
            item.PurposeOfReferenceCodeSequence[0].CodeValue: item.get("ContributionDateTime")
            for item in ds.ContributingEquipmentSequence
        }
        # the algorithm and highdicom at the object's time; the source's acquisition equipment
        # (RG1 names its manufacturer) with no time, as RG1 has no acquisition date
        assert purposes.pop("Newcode1") == purposes.pop("109102") == when.date_time
        assert purposes == ({"109101": None} if source.get("Manufacturer") else {})


def _dated(**values: str) -> Dataset:
    ds = factory_source(index=31)
    del ds.StudyDate, ds.StudyTime
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"ContentDate": "19950926", "ContentTime": "125130", "StudyDate": "20040826"},
            ("19950926", "125130"),
        ),
        (
            {"AcquisitionDateTime": "20250301081502.25+0100", "StudyDate": "20250301"},
            ("20250301", "081502.25"),
        ),
        (
            {"AcquisitionDate": "20250302", "AcquisitionTime": "0815", "StudyTime": "070000"},
            ("20250302", "0815"),
        ),
        ({"StudyDate": "20260101", "StudyTime": "101500.5"}, ("20260101", "101500.5")),
        ({"StudyDate": "20260101"}, ("20260101", "000000")),
        ({"ContentDate": "20261399", "StudyDate": "20260101"}, ("20260101", "000000")),
        ({"ContentDate": "20250101", "ContentTime": "10:15:00"}, ("20250101", "000000")),
        ({"StudyDate": ""}, (NO_SOURCE_DATE, NO_SOURCE_TIME)),
        ({}, ("19700101", "000000")),
    ],
)
def test_object_time_falls_back_from_content_to_acquisition_to_study_to_a_fixed_value(
    values: dict[str, str], expected: tuple[str, str]
) -> None:
    source = _dated(**values)
    when = ObjectTime.of_source(source)
    assert (when.date, when.time) == expected
    sr = build_sr(source, make_facts())
    assert (sr.ContentDate, sr.ContentTime) == expected
    assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == expected
    contributions = {
        item.ContributionDateTime
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue != "109101"
    }
    assert contributions == {"".join(expected)}


# Type 3 free text of the Patient and Patient Study modules, and more the result does not need.
UNNEEDED_PATIENT_TEXT = {
    "PatientComments": "HIV positive",
    "MedicalAlerts": "Sentinel alert: latex",
    "AdditionalPatientHistory": "Sentinel history of TB",
    "Allergies": "Sentinel allergy",
    "Occupation": "Sentinel occupation",
    "PatientWeight": "71.5",
    "OtherPatientNames": "Sentinel^Alias",
}


def test_the_objects_copy_only_what_filing_into_the_study_needs() -> None:
    """Issue 26: the SR copied the source's whole Patient and Study modules, Type 3 free text
    included (PatientComments "HIV positive", MedicalAlerts, AdditionalPatientHistory). The SR and
    the SC carry the identifiers and Type 2 attributes that file them into the study, nothing
    more."""
    source = factory_source(index=42)
    for keyword, value in UNNEEDED_PATIENT_TEXT.items():
        setattr(source, keyword, value)
    facts = ResultFacts.from_answer(ANSWER, positive_class="PNEUMONIA")
    for obj in render_objects(source, facts, grey_u8()):
        ds = pydicom.dcmread(io.BytesIO(obj.payload))
        for keyword, value in UNNEEDED_PATIENT_TEXT.items():
            assert keyword not in ds, (obj.kind, keyword)
            assert value.encode() not in obj.payload, (obj.kind, keyword)
        for keyword in PATIENT_STUDY:
            assert ds.get(keyword, "") == source.get(keyword, ""), (obj.kind, keyword)
