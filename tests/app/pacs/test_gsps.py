"""The attention region's Grayscale Softcopy Presentation State: it references the source image,
outlines the class activation map's hottest cell at its true place on the source's own pixel grid
(the SR's outline), says what it is, displays the source as the model saw it (DCMTK renders the
source through it to the model's own rendering), passes dciodvfy and DCMTK's presentation state
check, renders the same bytes under any clock, is made exactly where the SR carries a region, and
reaches a real Orthanc over STOW-RS and C-STORE beside the SR and the SC."""

from __future__ import annotations

import datetime
import io
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from app.contract import ModelMetadata, load_metadata
from app.imaging.dicom import DicomPolicy, open_dicom
from app.imaging.types import AppliedWindow
from app.pacs.delivery import DimseDestination, StowRsDestination, same_result
from app.pacs.gsps import (
    GRAYSCALE_SOFTCOPY_PRESENTATION_STATE,
    GSPS_SERIES_NUMBER,
    LAYER_NAME,
    REGION_LABEL,
    applied_window,
    build_gsps,
    region_outline,
    render_gsps,
    render_study_gsps,
    wants_gsps,
)
from app.pacs.objects import (
    ObjectTime,
    StudyImage,
    build_sr,
    build_study_sr,
    encode,
    render_objects,
)
from app.pacs.outbox import ResultObject
from app.pacs.pipeline import _presentation_states
from app.pacs.uids import result_instance_uid, result_series_uid, study_result_series_uid
from app.testing.dicom_files import CR_STORAGE, make_dataset, ramp
from tests.app.pacs.pacs_results import (
    DISCLAIMER,
    MODEL_SHA256,
    as_deliveries,
    assert_no_header_value_logged,
    factory_source,
    grey_u8,
    highdicom_clock_at,
    load_source,
    make_facts,
    rg1_path,
)
from tests.app.pacs.pacs_servers import ORTHANC_AET, Orthanc, require_tool
from tests.app.pacs.test_sr_report import pixelmed_output

REPO = Path(__file__).resolve().parents[3]
MAX_PIXELS, MIN_SIDE = 50_000_000, 64
# Patient and study attributes the GSPS copies from the source (their dates are the source's).
PATIENT_STUDY_TIMES = ("StudyDate", "StudyTime", "PatientBirthDate")


@pytest.fixture(scope="module")
def metadata() -> ModelMetadata:
    return load_metadata(REPO / "models" / "pneumonia_cxr.json")


def model_rendering(data: bytes, metadata: ModelMetadata) -> tuple[np.ndarray, AppliedWindow]:
    """The source as the display pipeline renders it for the model (full resolution) and the VOI
    it applied, as the answer's `dicom.window` reports it."""
    policy = DicomPolicy(
        rendering=metadata.preprocessing.dicom,
        intended_use=metadata.intended_use,
        max_inflated_bytes=MAX_PIXELS * 2 + 16 * 1024 * 1024,
    )
    rendered = open_dicom(data, MAX_PIXELS, MIN_SIDE, policy).render(policy)
    with rendered.image as image:
        grey = np.asarray(image.convert("L"))
    return grey, rendered.findings.window


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _source_bytes(name: str) -> bytes:
    return rg1_path().read_bytes() if name == "rg1_cr" else _part10(load_source(name))


def _window_of(name: str, metadata: ModelMetadata) -> AppliedWindow:
    return model_rendering(_source_bytes(name), metadata)[1]


def _hot_cell(row: int, column: int, cells: int = 7) -> list[list[float]]:
    grid = [[0.0] * cells for _ in range(cells)]
    grid[row][column] = 1.0
    return grid


def _outline(ds: Dataset) -> np.ndarray:
    (annotation,) = ds.GraphicAnnotationSequence
    (graphic,) = annotation.GraphicObjectSequence
    assert (graphic.GraphicType, graphic.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
    points = np.asarray(graphic.GraphicData, dtype=np.float64).reshape(-1, 2)
    assert len(points) == int(graphic.NumberOfGraphicPoints)
    return points


def _sr_outline(sr: Dataset) -> np.ndarray:
    """The SR's attention outline: the SCOORD of its attention-peak group."""
    for item in sr.iterall():
        if item.keyword == "GraphicData":
            points = np.asarray(item.value, dtype=np.float64).reshape(-1, 2)
            # the whole-image outline starts at the origin; the attention outline elsewhere
            if points[:, 0].min() > 0 or points[:, 1].min() > 0:
                return points
    raise AssertionError("the SR carries no attention outline")


@pytest.mark.parametrize("name", ["factory_cr", "factory_dx", "rg1_cr"])
def test_the_gsps_references_the_source_and_outlines_the_srs_region(
    name: str, metadata: ModelMetadata, tmp_path: Path
) -> None:
    source, facts = load_source(name), make_facts()
    window = _window_of(name, metadata)
    path = tmp_path / "gsps.dcm"
    path.write_bytes(encode(build_gsps(source, facts, window)))
    gsps = pydicom.dcmread(path)
    assert gsps.SOPClassUID == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE
    assert gsps.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (gsps.Modality, gsps.SeriesNumber) == ("PR", GSPS_SERIES_NUMBER)
    # in the source's study and patient, in a series of its own
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert gsps.get(keyword) == source.get(keyword), keyword
    assert gsps.SeriesInstanceUID not in (
        source.SeriesInstanceUID,
        result_series_uid(str(source.SOPInstanceUID), MODEL_SHA256, "sr"),
        result_series_uid(str(source.SOPInstanceUID), MODEL_SHA256, "sc"),
    )
    assert gsps.SOPInstanceUID == result_instance_uid(
        str(source.SOPInstanceUID), MODEL_SHA256, "gsps"
    )
    # Presentation State Relationship: the source's series and instance
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    (annotation,) = gsps.GraphicAnnotationSequence
    (annotated,) = annotation.ReferencedImageSequence
    assert annotated.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "ReferencedFrameNumber" not in annotated  # a single-frame image: its one frame
    # the layer, named for what it holds
    (layer,) = gsps.GraphicLayerSequence
    assert annotation.GraphicLayer == layer.GraphicLayer == LAYER_NAME
    assert "not a detection" in layer.GraphicLayerDescription
    # the outline: closed, inside the image, the SR's own region point for point
    rows, columns = int(source.Rows), int(source.Columns)
    outline = _outline(gsps)
    assert np.array_equal(outline[0], outline[-1])
    assert outline[:, 0].min() >= 0 and outline[:, 0].max() <= columns
    assert outline[:, 1].min() >= 0 and outline[:, 1].max() <= rows
    assert np.allclose(outline, _sr_outline(build_sr(source, facts)), atol=1e-3)
    # CAM's hottest cell is row 1, column 2 of 4 x 4: the model input is the whole image resized
    # without keeping its aspect ratio, so the cell scales onto the source per axis
    assert outline[:, 0].min() == pytest.approx(2 * columns / 4, abs=1e-3)
    assert outline[:, 0].max() == pytest.approx(3 * columns / 4, abs=1e-3)
    assert outline[:, 1].min() == pytest.approx(1 * rows / 4, abs=1e-3)
    assert outline[:, 1].max() == pytest.approx(2 * rows / 4, abs=1e-3)
    # the texts: a label at the outline, and what it is, the answer and the disclaimer in a box
    # inside the image and clear of the outline
    label, statement = annotation.TextObjectSequence
    assert label.UnformattedTextValue == REGION_LABEL
    assert list(label.AnchorPoint) == [outline[:, 0].min(), outline[:, 1].min()]
    assert label.AnchorPointAnnotationUnits == "PIXEL"
    text = statement.UnformattedTextValue
    assert "attention map region, not a detection" in text
    assert "Pneumonia: likely" in text and "probability 0.873" in text and "threshold 0.430" in text
    assert DISCLAIMER in text
    assert statement.BoundingBoxAnnotationUnits == "PIXEL"
    left, top = statement.BoundingBoxTopLeftHandCorner
    right, bottom = statement.BoundingBoxBottomRightHandCorner
    assert 0 <= left < right <= columns and 0 <= top < bottom <= rows
    assert bottom <= outline[:, 1].min() or top >= outline[:, 1].max()
    assert "research use" in gsps.ContentDescription.lower()
    assert gsps.SeriesDescription == "AI ATTENTION REGION - RESEARCH USE ONLY"


@pytest.mark.parametrize(("row", "column"), [(0, 0), (3, 5), (6, 6), (6, 0)])
def test_the_outline_is_at_the_hottest_cells_true_place_on_a_non_square_image(
    row: int, column: int
) -> None:
    """RG1 is 1841 x 1955: a 7 x 7 map's cell (r, c) covers columns c/7..(c+1)/7 of the width and
    rows r/7..(r+1)/7 of the height, within the image (the last cell ends on the last pixel)."""
    source = pydicom.dcmread(rg1_path(), stop_before_pixels=True)
    rows, columns = int(source.Rows), int(source.Columns)
    facts = make_facts(cam_grid=_hot_cell(row, column))
    outline = _outline(build_gsps(source, facts, None))
    assert outline[:, 0].min() == pytest.approx(column * columns / 7, abs=1e-2)
    assert outline[:, 0].max() == pytest.approx(
        min((column + 1) * columns / 7, columns - 1), abs=1e-2
    )
    assert outline[:, 1].min() == pytest.approx(row * rows / 7, abs=1e-2)
    assert outline[:, 1].max() == pytest.approx(min((row + 1) * rows / 7, rows - 1), abs=1e-2)
    assert outline[:, 0].max() <= columns and outline[:, 1].max() <= rows


def test_a_gsps_exactly_where_the_sr_carries_a_region() -> None:
    source = factory_source(index=71)
    positive, negative = make_facts(), make_facts(probability=0.2)
    no_map = make_facts(cam_grid=None)
    assert wants_gsps(positive) and not wants_gsps(negative) and not wants_gsps(no_map)
    window = AppliedWindow("full_range", 2047.5, 4095.0)
    (made,) = render_gsps(source, positive, window)
    assert (made.kind, made.sop_class_uid) == ("gsps", GRAYSCALE_SOFTCOPY_PRESENTATION_STATE)
    assert made.sop_instance_uid == str(pydicom.dcmread(io.BytesIO(made.payload)).SOPInstanceUID)
    assert render_gsps(source, negative, window) == []
    assert render_gsps(source, no_map, window) == []
    with pytest.raises(ValueError):
        build_gsps(source, negative, window)
    multi_frame = factory_source(index=76)
    multi_frame.NumberOfFrames = 2
    with pytest.raises(ValueError, match="single-frame"):
        build_gsps(multi_frame, positive, window)
    # the SR of the same answers: a second (attention) measurement group only beside the GSPS
    for facts in (positive, negative, no_map):
        groups = hd.sr.Comprehensive3DSR.from_dataset(build_sr(source, facts))
        measurements = groups.content.get_image_measurement_groups()
        assert (len(measurements) == 2) == wants_gsps(facts)


def test_the_window_comes_from_the_answer() -> None:
    answer = {"dicom": {"window": {"source": "window", "center": 15000, "width": 30000.0}}}
    assert applied_window(answer) == AppliedWindow("window", 15000.0, 30000.0, None)
    full = {"source": "full_range", "center": 10.5, "width": 21.0, "function": None}
    assert applied_window({"dicom": {"window": full}}) == AppliedWindow("full_range", 10.5, 21.0)
    assert applied_window({"dicom": None}) is None
    assert applied_window({}) is None
    assert applied_window({"dicom": {"window": {"source": "guess"}}}) is None


# Sources whose display pipelines differ: the VOI source (full range, window, VOI LUT), the VOI
# LUT Function, the Modality LUT (rescale, LUT sequence) and the polarity.
VARIANTS = {
    "full_range": {},
    "monochrome1_window": {"photometric": "MONOCHROME1", "window": (1800.0, 2600.0)},
    "rescale_window": {"rescale": (2.0, -1000.0), "window": (2500.0, 5000.0)},
    "linear_exact": {"window": (2048.0, 2048.0), "voi_function": "LINEAR_EXACT"},
    "voi_lut": {
        "voi_lut": (0, 12, [min(4095, int(4095 * (v / 4095) ** 0.5)) for v in range(4096)])
    },
    "modality_lut": {
        "modality_lut": (0, 12, [4095 - v for v in range(4096)]),
        "window": (2048.0, 4096.0),
    },
    "presentation_inverse": {"presentation_inverse": True},
    "monochrome1_full_range": {"photometric": "MONOCHROME1"},
}


def _variant(name: str) -> bytes:
    if name == "rg1_cr":
        return rg1_path().read_bytes()
    extra = {"StudyDate": "20260101", "StudyTime": "101500", "AccessionNumber": "ACC-1"}
    ds = make_dataset(ramp(), modality="CR", sop_class=CR_STORAGE, extra=extra, **VARIANTS[name])  # type: ignore[arg-type]
    return _part10(ds)


@pytest.mark.parametrize("name", [*VARIANTS, "rg1_cr"])
def test_dcmtk_displays_the_source_through_the_gsps_as_the_model_saw_it(
    name: str, metadata: ModelMetadata, tmp_path: Path
) -> None:
    """DCMTK's `dcmp2pgm` renders the source through the GSPS (its Modality LUT, Softcopy VOI LUT
    and Presentation LUT Shape) to the display pipeline's own rendering of the model input,
    within one grey level (rounding), for every kind of VOI, modality LUT and polarity."""
    dcmp2pgm = require_tool("dcmp2pgm", "dcmtk")
    data = _variant(name)
    source = pydicom.dcmread(io.BytesIO(data))
    expected, window = model_rendering(data, metadata)
    gsps_path, source_path, out = tmp_path / "gsps.dcm", tmp_path / "source.dcm", tmp_path / "o.pgm"
    source_path.write_bytes(data)
    gsps_path.write_bytes(encode(build_gsps(source, make_facts(), window)))
    run = subprocess.run(
        [dcmp2pgm, "-p", str(gsps_path), str(source_path), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    _assert_valid(gsps_path)
    with Image.open(out) as image:
        shown = np.asarray(image.convert("L")).astype(int)
    assert shown.shape == expected.shape
    difference = np.abs(shown - expected.astype(int))
    assert difference.max() <= 1, (name, window, int(difference.max()))
    # the comparison can fail: without the GSPS, DCMTK shows these sources otherwise
    if name in ("full_range", "presentation_inverse"):
        plain = subprocess.run(
            [dcmp2pgm, str(source_path), str(tmp_path / "plain.pgm")], capture_output=True
        )
        assert plain.returncode == 0
        with Image.open(tmp_path / "plain.pgm") as image:
            default = np.asarray(image.convert("L")).astype(int)
        assert np.abs(default - expected.astype(int)).max() > 1


def test_a_sigmoid_window_is_carried_as_applied() -> None:
    """DCMTK 3.6.7 shows a SIGMOID window as a LINEAR one (the source without a GSPS too), so the
    display comparison above cannot take it: the GSPS carries the function, centre and width."""
    source = make_dataset(ramp(), window=(2000.0, 3000.0), voi_function="SIGMOID")
    window = AppliedWindow("window", 2000.0, 3000.0, "SIGMOID")
    (voi,) = build_gsps(source, make_facts(), window).SoftcopyVOILUTSequence
    assert (voi.VOILUTFunction, float(voi.WindowCenter), float(voi.WindowWidth)) == (
        "SIGMOID",
        2000.0,
        3000.0,
    )


def _assert_valid(path: Path) -> None:
    """dciodvfy finds no error and DCMTK's presentation state check passes."""
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    dcmpschk = require_tool("dcmpschk", "dcmtk")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert "GrayscaleSoftcopyPresentationState" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []
    checked = subprocess.run([dcmpschk, str(path)], capture_output=True, text=True, timeout=60)
    report = checked.stdout + checked.stderr
    assert checked.returncode == 0 and "Test passed" in report, report
    assert [line for line in report.splitlines() if line.startswith(("E:", "F:"))] == []


@pytest.mark.parametrize("name", ["factory_cr", "factory_dx", "rg1_cr"])
def test_dciodvfy_and_dcmpschk_report_no_error(
    name: str, metadata: ModelMetadata, tmp_path: Path
) -> None:
    path = tmp_path / "gsps.dcm"
    window = _window_of(name, metadata)
    path.write_bytes(encode(build_gsps(load_source(name), make_facts(), window)))
    _assert_valid(path)


def test_pixelmed_reports_no_error(metadata: ModelMetadata, tmp_path: Path) -> None:
    """PixelMed's IOD validator, where its release knows the GSPS IOD (Debian's 20220618 knows
    only a few image IODs and answers "IOD (SOP Class) unrecognized": skipped, saying so)."""
    path = tmp_path / "gsps.dcm"
    window = _window_of("rg1_cr", metadata)
    path.write_bytes(encode(build_gsps(load_source("rg1_cr"), make_facts(), window)))
    output = pixelmed_output(path, "DicomInstanceValidator")
    if "IOD (SOP Class) unrecognized" in output:
        pytest.skip("this PixelMed release has no GSPS IOD to validate against")
    assert "IOD validation complete" in output, output[-2000:]
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


def _times(ds: Dataset) -> list[tuple[str, str]]:
    return [(e.keyword, str(e.value)) for e in ds.iterall() if e.VR in ("DA", "TM", "DT")]


def test_the_same_reading_renders_the_same_bytes_across_a_clock_change(
    metadata: ModelMetadata,
) -> None:
    """Rendered under a clock on another day, then under the real clock past a second boundary:
    the same bytes; every date and time is the source's (its Content Date/Time for RG1)."""
    source = load_source("rg1_cr")
    facts, window = make_facts(), _window_of("rg1_cr", metadata)
    with highdicom_clock_at(datetime.datetime(2031, 7, 4, 23, 59, 58, 123456)):
        (first,) = render_gsps(source, facts, window)
    second_started = int(time.time())
    time.sleep(second_started + 1.05 - time.time())
    (second,) = render_gsps(source, facts, window)
    assert int(time.time()) > second_started
    assert first.payload == second.payload
    ds = pydicom.dcmread(io.BytesIO(first.payload))
    when = ObjectTime.of_source(source)
    assert (when.date, when.time) == ("19950926", "125130")
    assert (ds.PresentationCreationDate, ds.PresentationCreationTime) == (when.date, when.time)
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == (when.date, when.time)
    own = {when.date, when.time, when.date_time}
    for keyword, value in _times(ds):
        if keyword in PATIENT_STUDY_TIMES:
            assert value == str(source.get(keyword, "")), keyword
        else:
            assert value in own, keyword
    # another model, another site profile or other pixels: other UIDs
    others = (
        make_facts(model_sha256="0" * 64),
        make_facts(site_profile_sha256="1" * 64),
        make_facts(pixel_digest="2" * 64),
    )
    uids = {str(build_gsps(source, other, window).SOPInstanceUID) for other in others}
    assert len(uids | {first.sop_instance_uid}) == 4


def test_building_logs_and_warns_nothing_from_the_header(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """highdicom quotes odd person names in warnings and source UIDs in INFO logs; neither may
    reach the service's logs (RG1's referring physician is the one-word name "ward")."""
    source = load_source("rg1_cr")
    caplog.set_level("DEBUG")
    built = build_gsps(source, make_facts(), AppliedWindow("window", 15000.0, 30000.0, "LINEAR"))
    assert built.ReferringPhysicianName == "ward"  # the real value is still copied
    assert_no_header_value_logged(source, caplog, recwarn)


def test_the_archive_comparison_tells_another_region_apart() -> None:
    """A refused duplicate is compared with the archive's copy: the same GSPS is the same result,
    one with another outline or another display is not."""
    source = factory_source(index=72)
    window = AppliedWindow("full_range", 2047.5, 4095.0)
    ours = encode(build_gsps(source, make_facts(), window))
    assert same_result(ours, ours) is None
    moved = encode(build_gsps(source, make_facts(cam_grid=_hot_cell(0, 0, 4)), window))
    assert same_result(ours, moved) == "archive copy content items differ"
    darker = encode(build_gsps(source, make_facts(), AppliedWindow("full_range", 1000.0, 4095.0)))
    assert same_result(ours, darker) == "archive copy content items differ"
    # dates are not compared: an archive copy rendered with another stamp is the same result
    restamped = pydicom.dcmread(io.BytesIO(ours))
    restamped.PresentationCreationDate = "20990101"
    assert same_result(ours, encode(restamped)) is None


def _objects_of(source: Dataset, metadata: ModelMetadata) -> list[ResultObject]:
    facts = make_facts()
    objects = render_objects(source, facts, grey_u8())
    window = model_rendering(_part10(source), metadata)[1]
    return objects + render_gsps(source, facts, window)


def _check_gsps_in_orthanc(orthanc: Orthanc, source: Dataset, gsps: ResultObject) -> None:
    (found,) = orthanc.find_instance(gsps.sop_instance_uid)
    tags = orthanc.instance_tags(found)
    assert tags["Modality"] == "PR"
    assert tags["StudyInstanceUID"] == source.StudyInstanceUID
    assert tags["SeriesInstanceUID"] != source.SeriesInstanceUID
    stored = orthanc.file(found)
    read = pydicom.dcmread(io.BytesIO(stored))
    # the data set as sent (C-STORE gives Orthanc no file meta: it writes its own)
    assert read == pydicom.dcmread(io.BytesIO(gsps.payload))
    assert same_result(gsps.payload, stored) is None
    referenced = read.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_stow_rs_stores_the_gsps_beside_the_sr_and_sc(
    orthanc: Orthanc, metadata: ModelMetadata
) -> None:
    source = factory_source("CR", index=73)
    objects = _objects_of(source, metadata)
    assert [o.kind for o in objects] == ["sr", "sc", "gsps"]
    outcomes = StowRsDestination(orthanc.dicomweb).send(as_deliveries(objects, "stow"))
    assert [o.verdict for o in outcomes] == ["stored"] * 3, outcomes
    _check_gsps_in_orthanc(orthanc, source, objects[2])
    # a second copy: Orthanc keeps the first and answers success
    again = StowRsDestination(orthanc.dicomweb).send(as_deliveries(objects[2:], "stow"))
    assert [o.verdict for o in again] == ["stored"]


def test_c_store_stores_the_gsps_beside_the_sr_and_sc(
    orthanc: Orthanc, metadata: ModelMetadata
) -> None:
    source = factory_source("DX", index=74)
    objects = _objects_of(source, metadata)
    destination = DimseDestination.parse(f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}")
    outcomes = destination.send(as_deliveries(objects, destination.name))
    assert [(o.verdict, o.summary) for o in outcomes] == [("stored", "dimse status 0x0000")] * 3
    _check_gsps_in_orthanc(orthanc, source, objects[2])


STUDY_WINDOW = {"dicom": {"window": {"source": "full_range", "center": 2047.5, "width": 4095.0}}}


def _study(study_uid: str) -> list[StudyImage]:
    """Three frontal images of one study: positive with the map's peak at row 1, column 2;
    negative; positive with its peak at row 0, column 0."""
    facts = (make_facts(), make_facts(probability=0.2), make_facts(cam_grid=_hot_cell(0, 0, 4)))
    images = []
    for index, image_facts in zip((81, 82, 83), facts, strict=True):
        source = factory_source(index=index)
        source.StudyInstanceUID = study_uid
        images.append(StudyImage(source, image_facts))
    return images


def test_a_study_result_gets_a_gsps_for_each_region_its_sr_carries(tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.10.1001.1.80"
    images = _study(study_uid)
    answers = {image.sop_instance_uid: STUDY_WINDOW for image in images}
    digest = "a" * 64
    made = render_study_gsps(list(reversed(images)), answers, digest)
    assert [o.kind for o in made] == ["gsps", "gsps"]
    read = [pydicom.dcmread(io.BytesIO(o.payload)) for o in made]
    # image N of the study SR (SOP Instance UID order) is instance N; the negative one has none
    assert [int(ds.InstanceNumber) for ds in read] == [1, 3]
    referenced = [
        ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        for ds in read
    ]
    assert referenced == [images[0].sop_instance_uid, images[2].sop_instance_uid]
    # one series per study and reading, in the study
    series = study_result_series_uid(study_uid, MODEL_SHA256, "gsps", None)
    assert {ds.SeriesInstanceUID for ds in read} == {series}
    assert {ds.StudyInstanceUID for ds in read} == {study_uid}
    # each outline at its own image's peak, as in the study SR
    for ds, image in zip(read, (images[0], images[2]), strict=True):
        assert np.allclose(_outline(ds), region_outline(image.source, image.facts))
    study_sr = build_study_sr(images, [], digest)
    groups = hd.sr.Comprehensive3DSR.from_dataset(study_sr).content
    assert len(groups.get_image_measurement_groups()) == 3 + len(made)
    # the same set renders the same bytes; another set other instances in the same series
    assert [o.payload for o in render_study_gsps(images, answers, digest)] == [
        o.payload for o in made
    ]
    again = [
        pydicom.dcmread(io.BytesIO(o.payload)) for o in render_study_gsps(images, answers, "b" * 64)
    ]
    assert {ds.SeriesInstanceUID for ds in again} == {series}
    assert not {ds.SOPInstanceUID for ds in again} & {ds.SOPInstanceUID for ds in read}
    path = tmp_path / "study-gsps.dcm"
    path.write_bytes(made[1].payload)
    _assert_valid(path)


def test_a_gsps_that_cannot_be_built_leaves_the_result_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SR and SC are recorded all the same; the log names the error's type, no value."""

    def fails() -> list[ResultObject]:
        raise ValueError("1.2.826.0.1.3680043.10.1001.3.99 header value")

    caplog.set_level("WARNING")
    assert _presentation_states(fails) == []
    (record,) = [r for r in caplog.records if "presentation state" in r.getMessage()]
    assert record.fields == {"error": "ValueError"}  # type: ignore[attr-defined]
    assert "1.2.826" not in record.getMessage()
    (made,) = _presentation_states(
        lambda: render_gsps(factory_source(index=84), make_facts(), None)
    )
    assert made.kind == "gsps"


def test_the_intake_reading_studies_records_the_gsps_with_the_study_sr(tmp_path: Path) -> None:
    """Through the service: the CAM model with the heat-map setting, one verdict per study, two
    frontal images pushed over STOW-RS; the study's result holds one GSPS per positive image
    (whose region the study SR carries), on that image, with its model input's VOI."""
    import json

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.testing import dicom_files as factory
    from tests.app.pacs.intake_tools import instance
    from tests.support.testkit import build_cam_onnx, cam_metadata_for, make_settings

    onnx_bytes, dense, bias = build_cam_onnx()
    meta = cam_metadata_for(onnx_bytes, dense, bias)
    (tmp_path / meta["onnx_file"]).write_bytes(onnx_bytes)
    (tmp_path / "cam.json").write_text(json.dumps(meta))
    settings = make_settings(
        tmp_path / "cam.json",
        state_dir=tmp_path / "state",
        study_stable_seconds=0.2,
        results_heatmap=True,
    )
    study_uid = "1.2.826.0.1.3680043.10.1001.1.90"
    images = {
        f"1.2.826.0.1.3680043.10.1001.3.9{seed}": instance(
            sop_instance_uid=f"1.2.826.0.1.3680043.10.1001.3.9{seed}",
            study_uid=study_uid,
            stored=np.roll(factory.ramp(256, 256), 40 * seed, axis=1),
        )
        for seed in (1, 2)
    }
    parts = b"".join(
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
        for data in images.values()
    )
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    with TestClient(create_app(settings)) as client:
        stowed = client.post("/dicomweb/studies", content=parts + b"--b--\r\n", headers=headers)
        assert stowed.status_code == 200, stowed.text
        deadline = time.monotonic() + 60.0
        first = next(iter(images))
        while client.get(f"/results/{first}").status_code != 200:
            assert time.monotonic() < deadline, "the study's result was not recorded"
            time.sleep(0.2)
        body = client.get(f"/results/{first}").json()
        read = body["answer"]["study"]["images_read"]
        assert sorted(i["sop_instance_uid"] for i in read) == sorted(images)
        positive = sorted(i["sop_instance_uid"] for i in read if i["label"] == "PNEUMONIA")
        assert positive, "the CAM model read no image as positive: nothing to outline"
        kinds = [o["kind"] for o in body["result"]["objects"]]
        assert sorted(kinds) == sorted(["sr"] + ["gsps"] * len(positive))
        pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
        objects = pipeline.outbox.objects(pipeline.result(first).result_key)
        states = [pydicom.dcmread(io.BytesIO(o.payload)) for o in objects if o.kind == "gsps"]
    references = sorted(
        str(ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for ds in states
    )
    assert references == positive
    for ds in states:
        (voi,) = ds.SoftcopyVOILUTSequence
        assert voi.VOILUTFunction == "LINEAR_EXACT"  # the full range of the factory's values
        assert ds.StudyInstanceUID == study_uid
