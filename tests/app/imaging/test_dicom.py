"""DICOM uploads: every transfer syntax, every step of the display pipeline, the intended-use gate,
and hostile files. Files are made by `app.testing.dicom_files`; pydicom's own shipped files (written
by other tools) are run through the whole service at the end."""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate, generate_fragments

from app.contract import DicomRendering, IntendedUse
from app.errors import (
    ImageTooManyPixels,
    ImageTooSmall,
    InvalidImage,
    NotIntendedUse,
    OutsideTrainingPopulation,
    ServiceError,
)
from app.imaging.dicom import DicomPolicy, patient_age_years
from app.imaging.formats import DecodeLimits, decode_upload
from app.testing.dicom_files import (
    CR_STORAGE,
    CT_STORAGE,
    DX_FOR_PROCESSING,
    LOSSY,
    MR_STORAGE,
    SC_STORAGE,
    SERIES_UID,
    SOP_UID,
    STUDY_UID,
    SYNTAXES,
    US_STORAGE,
    encode_dataset,
    make_dataset,
    make_dicom,
    ramp,
)
from tests.support.testkit import DICOM_RENDERING, INTENDED_USE

LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64)
POLICY = DicomPolicy(
    rendering=DicomRendering.model_validate(DICOM_RENDERING),
    intended_use=IntendedUse.model_validate(INTENDED_USE),
)


def grey(data: bytes, policy: DicomPolicy = POLICY) -> np.ndarray:
    decoded = decode_upload(data, LIMITS, policy)
    assert decoded.format == "DICOM" and decoded.image.mode == "L"
    return np.asarray(decoded.image).astype(np.int64)


def minmax_8bit(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.int64)


# -- transfer syntaxes ------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_every_transfer_syntax_decodes_to_the_expected_image(syntax: str) -> None:
    eight_bit = syntax == "jpeg_baseline"
    stored = ramp(high=255, dtype=np.uint8) if eight_bit else ramp(high=4095)
    data = make_dicom(stored, syntax, bits_stored=8 if eight_bit else 12)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    decoded = decode_upload(data, LIMITS, POLICY)
    image = np.asarray(decoded.image).astype(np.int64)
    # lossless syntaxes are exact; the lossy ones were encoded at high quality
    tolerance = 2 if syntax in LOSSY else 0
    assert np.abs(image - minmax_8bit(stored)).max() <= tolerance
    assert decoded.dicom is not None
    assert decoded.dicom.transfer_syntax == str(SYNTAXES[syntax])
    assert decoded.dicom.window.source == "full_range"


# -- the display pipeline ---------------------------------------------------------------------


def test_monochrome1_is_inverted_so_that_air_is_dark() -> None:
    stored = ramp()
    assert np.array_equal(
        grey(make_dicom(stored, photometric="MONOCHROME1")), 255 - minmax_8bit(stored)
    )


def test_presentation_lut_inverse_inverts_monochrome2() -> None:
    stored = ramp()
    data = make_dicom(stored, presentation_inverse=True)
    assert np.array_equal(grey(data), 255 - minmax_8bit(stored))


def test_monochrome1_with_inverse_presentation_is_inverted_once_not_twice() -> None:
    stored = ramp()
    data = make_dicom(stored, photometric="MONOCHROME1", presentation_inverse=True)
    assert np.array_equal(grey(data), 255 - minmax_8bit(stored))


def test_linear_window_follows_the_standard_formula() -> None:
    stored = ramp()
    c, w = 1500.0, 1000.0
    expected = np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    image = grey(make_dicom(stored, window=(c, w)))
    assert np.array_equal(image, np.rint(expected * 255))
    assert image.min() == 0 and image.max() == 255  # values outside the window clip


def test_the_window_applies_to_modality_values_after_rescale() -> None:
    stored = ramp()
    # modality value = stored * 2 - 1000; a window of [1000, 3000] in modality units
    image = grey(make_dicom(stored, rescale=(2.0, -1000.0), window=(2000.0, 2001.0)))
    modality = stored * 2.0 - 1000.0
    expected = np.clip((modality - 1999.5) / 2000.0 + 0.5, 0, 1)
    assert np.array_equal(image, np.rint(expected * 255))


def test_only_the_first_of_several_windows_is_used() -> None:
    stored = ramp()
    first = grey(make_dicom(stored, window=([1000.0, 3000.0], [500.0, 4000.0])))
    alone = grey(make_dicom(stored, window=(1000.0, 500.0)))
    assert np.array_equal(first, alone)


def test_linear_exact_and_sigmoid_windows() -> None:
    stored = ramp()
    c, w = 2000.0, 1200.0
    exact = grey(make_dicom(stored, window=(c, w), voi_function="LINEAR_EXACT"))
    assert np.array_equal(exact, np.rint(np.clip((stored - c) / w + 0.5, 0, 1) * 255))
    sigmoid = grey(make_dicom(stored, window=(c, w), voi_function="SIGMOID"))
    assert np.array_equal(sigmoid, np.rint(255 / (1 + np.exp(-4 * (stored - c) / w))))
    assert not np.array_equal(exact, sigmoid)


def test_voi_lut_sequence_is_used_without_a_window() -> None:
    stored = ramp(high=1023)
    table = [min(255, v // 2) for v in range(1024)]  # a LUT with 8-bit output
    image = grey(make_dicom(stored, bits_stored=10, voi_lut=(0, 8, table)))
    assert np.array_equal(image, np.rint(np.minimum(stored // 2, 255) / 255 * 255))


def test_a_window_is_preferred_to_a_voi_lut_sequence() -> None:
    stored = ramp()
    both = make_dicom(stored, window=(2000.0, 1000.0), voi_lut=(0, 8, [0] * 4096))
    assert np.array_equal(grey(both), grey(make_dicom(stored, window=(2000.0, 1000.0))))


def test_modality_lut_sequence_replaces_rescale() -> None:
    stored = ramp(high=1023)
    table = [1023 - v for v in range(1024)]  # a reversing modality LUT
    image = grey(make_dicom(stored, bits_stored=10, modality_lut=(0, 16, table)))
    assert np.array_equal(image, minmax_8bit(1023 - stored))


def test_full_range_excludes_pixel_padding_and_paints_it_black() -> None:
    stored = ramp(high=3000)
    stored[:10, :] = 4095  # padding outside the collimated field
    image = grey(make_dicom(stored, padding=(4095, None)))
    body = stored[10:]
    assert np.array_equal(image[10:], minmax_8bit(body))
    assert (image[:10] == 0).all()


def test_pixel_padding_range_limit_excludes_a_range() -> None:
    stored = ramp(high=3000)
    stored[:8, :] = 4000 + np.arange(stored.shape[1])[None, :] % 50
    image = grey(make_dicom(stored, padding=(4000, 4049)))
    assert np.array_equal(image[8:], minmax_8bit(stored[8:]))
    assert (image[:8] == 0).all()


def test_signed_pixels_render_by_value() -> None:
    stored = (ramp(high=4000).astype(np.int32) - 2000).astype(np.int16)
    image = grey(make_dicom(stored, window=(0.0, 2001.0)))
    expected = np.clip((stored - (-0.5)) / 2000.0 + 0.5, 0, 1)
    assert np.array_equal(image, np.rint(expected * 255))


@pytest.mark.parametrize("width", [0.0, 0.5, -100.0])
def test_an_unusable_window_falls_back_to_the_full_range_with_a_warning(width: float) -> None:
    stored = ramp()
    decoded = decode_upload(make_dicom(stored, window=(2000.0, width)), LIMITS, POLICY)
    assert np.array_equal(np.asarray(decoded.image), minmax_8bit(stored))
    assert decoded.dicom is not None and decoded.dicom.window.source == "full_range"
    assert any("window" in w for w in decoded.dicom.warnings)


def test_the_findings_echo_uids_modality_view_and_the_window() -> None:
    decoded = decode_upload(make_dicom(ramp(), window=(2000.0, 1000.0), view="AP"), LIMITS, POLICY)
    findings = decoded.dicom
    assert findings is not None
    assert (
        findings.study_instance_uid,
        findings.series_instance_uid,
        findings.sop_instance_uid,
    ) == (
        STUDY_UID,
        SERIES_UID,
        SOP_UID,
    )
    assert (findings.modality, findings.view_position) == ("DX", "AP")
    assert (findings.window.source, findings.window.center, findings.window.width) == (
        "window",
        2000.0,
        1000.0,
    )
    assert findings.window.function == "LINEAR"


def test_a_constant_image_renders_black() -> None:
    assert (grey(make_dicom(np.full((80, 80), 700, dtype=np.uint16))) == 0).all()


# -- intended use -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"modality": "CT", "sop_class": CT_STORAGE}, "Modality CT"),
        ({"modality": "MR", "sop_class": MR_STORAGE}, "Modality MR"),
        ({"modality": "US", "sop_class": US_STORAGE}, "Modality US"),
        ({"modality": "NM"}, "Modality NM"),
        ({"modality": "PT"}, "Modality PT"),
        ({"modality": "OT", "sop_class": SC_STORAGE}, "Modality OT"),
        ({"modality": "SR"}, "Modality SR"),
        ({"modality": "SEG"}, "Modality SEG"),
        ({"modality": "RTIMAGE"}, "Modality RTIMAGE"),
        ({"modality": None}, "no Modality"),
        ({"modality": "DX", "sop_class": SC_STORAGE}, "SOP Class UID"),
        ({"modality": "DX", "sop_class": DX_FOR_PROCESSING}, "SOP Class UID"),
        ({"body_part": "SKULL"}, "Body Part Examined is SKULL"),
        ({"body_part": "HAND"}, "not a chest"),
        ({"view": "LL"}, "View Position LL"),
        ({"view": "RL"}, "lateral"),
        ({"view": "LATERAL"}, "lateral"),
        ({"photometric": "RGB"}, "colour"),
    ],
)
def test_files_outside_the_intended_use_are_refused_with_the_reason(options, fragment) -> None:
    stored = ramp()
    if options.get("photometric") == "RGB":
        ds = make_dataset(stored)
        ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.repeat((stored // 16).astype(np.uint8)[..., None], 3, axis=2).tobytes()
        data = encode_dataset(ds)
    else:
        data = make_dicom(stored, **options)
    with pytest.raises(NotIntendedUse) as excinfo:
        decode_upload(data, LIMITS, POLICY)
    assert excinfo.value.status_code == 422
    assert excinfo.value.code == "not_intended_use"
    assert fragment in excinfo.value.message


@pytest.mark.parametrize(
    "options",
    [
        {"modality": "CR", "sop_class": CR_STORAGE},
        {"body_part": None, "view": None},
        {"body_part": "chest ", "view": "ap"},
        {"body_part": "THORAX", "view": "PA"},
    ],
)
def test_chest_radiographs_are_accepted(options) -> None:
    assert grey(make_dicom(ramp(), **options)).shape == (96, 80)


def test_multi_frame_files_are_refused() -> None:
    stored = np.stack([ramp(), ramp()])
    ds = make_dataset(stored[0])
    ds.NumberOfFrames = 2
    ds.PixelData = stored.tobytes()
    with pytest.raises(NotIntendedUse, match="2 frames"):
        decode_upload(encode_dataset(ds), LIMITS, POLICY)


def test_a_file_without_pixel_data_is_refused() -> None:
    ds = make_dataset(ramp())
    del ds.PixelData
    with pytest.raises(NotIntendedUse, match="no integer pixel data"):
        decode_upload(encode_dataset(ds), LIMITS, POLICY)


def test_a_dicomdir_is_refused() -> None:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    with pytest.raises(NotIntendedUse, match="DICOMDIR"):
        decode_upload(path.read_bytes(), LIMITS, POLICY)


@pytest.mark.parametrize("name", ["reportsi.dcm", "test-SR.dcm"])
def test_a_structured_report_is_refused(name: str) -> None:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    with pytest.raises(NotIntendedUse, match="Modality SR"):
        decode_upload(path.read_bytes(), LIMITS, POLICY)


# -- age and the training population ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "years"),
    [
        ({"PatientAge": "003Y"}, 3.0),
        ({"PatientAge": "018M"}, 1.5),
        ({"PatientAge": "052W"}, 52 * 7 / 365.25),
        ({"PatientAge": "010D"}, 10 / 365.25),
        ({"PatientBirthDate": "20200101", "StudyDate": "20230101"}, 1096 / 365.25),
        ({"PatientBirthDate": "20200101", "AcquisitionDate": "20210701"}, 547 / 365.25),
        ({"PatientAge": "garbage"}, None),
        ({"PatientBirthDate": "20200101"}, None),
        ({"PatientBirthDate": "20250101", "StudyDate": "20200101"}, None),
    ],
)
def test_patient_age_from_age_or_dates(tags, years) -> None:
    ds = pydicom.Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    age = patient_age_years(ds)
    assert age == pytest.approx(years) if years is not None else age is None


@pytest.mark.parametrize("age", ["030Y", "000Y", "006Y", "008M"])
def test_a_patient_outside_the_training_population_gets_a_warning(age: str) -> None:
    decoded = decode_upload(make_dicom(ramp(), patient_age=age), LIMITS, POLICY)
    assert decoded.dicom is not None
    (warning,) = decoded.dicom.warnings
    assert "outside the training population" in warning
    assert age not in warning and str(int(age[:3])) not in warning.split("(")[0]


@pytest.mark.parametrize("age", ["001Y", "003Y", "005Y", "014M", None])
def test_a_patient_inside_the_training_population_or_of_unknown_age_gets_none(age) -> None:
    decoded = decode_upload(make_dicom(ramp(), patient_age=age), LIMITS, POLICY)
    assert decoded.dicom is not None and decoded.dicom.warnings == []


def test_a_site_can_refuse_patients_outside_the_training_population() -> None:
    strict = DicomPolicy(POLICY.rendering, POLICY.intended_use, refuse_outside_population=True)
    with pytest.raises(OutsideTrainingPopulation) as excinfo:
        decode_upload(make_dicom(ramp(), patient_age="045Y"), LIMITS, strict)
    assert excinfo.value.status_code == 422
    assert excinfo.value.code == "outside_training_population"
    assert "045" not in excinfo.value.message
    assert grey(make_dicom(ramp(), patient_age="004Y"), strict).shape == (96, 80)


# -- limits and hostile files -----------------------------------------------------------------


def test_a_65535_square_header_is_refused_before_decoding() -> None:
    ds = make_dataset(ramp())
    ds.Rows = ds.Columns = 65535
    with pytest.raises(ImageTooManyPixels, match="65535x65535"):
        decode_upload(encode_dataset(ds), LIMITS, POLICY)


def test_a_header_over_the_pixel_limit_is_refused_for_compressed_data_too() -> None:
    data = make_dicom(ramp(), "jpeg_ls")
    with pytest.raises(ImageTooManyPixels):
        decode_upload(data, DecodeLimits(max_pixels=5000, min_side=64), POLICY)


def test_a_small_image_is_refused() -> None:
    with pytest.raises(ImageTooSmall):
        decode_upload(make_dicom(ramp(rows=40, columns=200)), LIMITS, POLICY)


def test_truncated_native_pixel_data_is_refused() -> None:
    ds = make_dataset(ramp())
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(InvalidImage, match="truncated"):
        decode_upload(encode_dataset(ds), LIMITS, POLICY)


def test_rows_and_columns_that_lie_about_a_compressed_frame_are_refused() -> None:
    ds = make_dataset(ramp())
    data = encode_dataset(ds, "j2k_lossless")
    lying = pydicom.dcmread(io.BytesIO(data))
    lying.Rows, lying.Columns = 2000, 2000
    buffer = io.BytesIO()
    lying.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InvalidImage, match="compressed frame is 80x96"):
        decode_upload(buffer.getvalue(), LIMITS, POLICY)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize(
    "syntax", ["jpeg_baseline", "jpeg_extended", "jpeg_lossless", "jpeg_ls", "j2k", "rle"]
)
def test_an_encapsulated_frame_that_does_not_decode_is_a_422(syntax: str, damage: str) -> None:
    eight_bit = syntax == "jpeg_baseline"
    stored = ramp(high=255, dtype=np.uint8) if eight_bit else ramp()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(stored, syntax, bits_stored=8 if eight_bit else 12)))
    frame = list(generate_fragments(ds.PixelData))[1]
    rng = random.Random(syntax)
    bad = frame[: len(frame) // 3] if damage == "truncated" else frame[:2] + rng.randbytes(600)
    ds.PixelData = encapsulate([bad + b"\0" * (len(bad) % 2)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InvalidImage) as excinfo:
        decode_upload(buffer.getvalue(), LIMITS, POLICY)
    assert excinfo.value.status_code == 422


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    data = make_dicom(ramp(), "deflated")
    prefix_end = data.find(b"1.2.840.10008.1.2.1.99") + 22
    meta_end = prefix_end + (prefix_end % 2)  # the UID value is padded to even length
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\0" * (64 * 1024 * 1024)) + compressor.flush()
    small = DicomPolicy(POLICY.rendering, POLICY.intended_use, max_inflated_bytes=8 << 20)
    with pytest.raises(ImageTooManyPixels, match="inflates past"):
        decode_upload(data[:meta_end] + bomb, LIMITS, small)


def test_a_file_without_a_transfer_syntax_is_refused() -> None:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "meta_missing_tsyntax.dcm"
    with pytest.raises(InvalidImage):
        decode_upload(path.read_bytes(), LIMITS, POLICY)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, 0.999])
def test_truncated_files_are_refused(keep: float) -> None:
    data = make_dicom(ramp(), "explicit_le")
    with pytest.raises(ServiceError) as excinfo:
        decode_upload(data[: int(len(data) * keep)], LIMITS, POLICY)
    assert 400 <= excinfo.value.status_code < 500


def _with_broken_value(keyword: str, value: bytes, **options) -> bytes:
    """A file whose DS value is not a number: written valid, then overwritten in the bytes."""
    data = make_dicom(ramp(), extra={keyword: value.decode()}, **options)
    assert data.count(value) == 1
    return data.replace(value, b"x" * len(value))


def test_a_rescale_slope_that_is_not_a_number_is_a_422() -> None:
    with pytest.raises(InvalidImage) as excinfo:
        decode_upload(_with_broken_value("RescaleSlope", b"2.0000"), LIMITS, POLICY)
    assert excinfo.value.status_code == 422


def test_a_window_that_is_not_a_number_is_ignored_with_a_warning() -> None:
    data = make_dicom(ramp(), window=(1234.5, 1000.0))
    assert data.count(b"1234.5") == 1
    decoded = decode_upload(data.replace(b"1234.5", b"xxxxxx"), LIMITS, POLICY)
    assert decoded.dicom is not None and decoded.dicom.window.source == "full_range"
    assert np.array_equal(np.asarray(decoded.image), minmax_8bit(ramp()))
    assert any("window" in w for w in decoded.dicom.warnings)


def test_mutated_files_never_escape_as_unexpected_errors() -> None:
    """A bounded fuzz: bit flips and byte runs over several valid files of different syntaxes."""
    rng = random.Random(7)
    syntaxes = ("explicit_le", "deflated", "rle", "jpeg_lossless", "jpeg_ls", "j2k", "j2k_lossless")
    seeds = [make_dicom(ramp(), syntax) for syntax in syntaxes]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(420):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(128, len(data))
            if rng.random() < 0.5:
                data[position] ^= 1 << rng.randrange(8)
            else:
                data[position : position + 4] = rng.randbytes(4)
        try:
            decode_upload(bytes(data), LIMITS, POLICY)
            outcomes["ok"] += 1
        except ServiceError as exc:
            assert 400 <= exc.status_code < 500, exc
            outcomes["refused"] += 1
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


# -- over HTTP --------------------------------------------------------------------------------


def test_raw_dicom_upload_returns_a_prediction_with_its_uids(client: TestClient) -> None:
    data = make_dicom(ramp(), "jpeg_ls", window=(2000.0, 3000.0), view="AP", patient_age="004Y")
    response = client.post("/predict", content=data, headers={"content-type": "application/dicom"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dicom"]["study_instance_uid"] == STUDY_UID
    assert body["dicom"]["series_instance_uid"] == SERIES_UID
    assert body["dicom"]["sop_instance_uid"] == SOP_UID
    assert body["dicom"]["modality"] == "DX" and body["dicom"]["view_position"] == "AP"
    assert body["dicom"]["window"] == {
        "source": "window",
        "center": 2000.0,
        "width": 3000.0,
        "function": "LINEAR",
    }
    assert body["warnings"] == []
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)


def test_multipart_and_octet_stream_dicom_give_the_same_answer(client: TestClient) -> None:
    data = make_dicom(ramp(), "rle")
    raw = client.post("/predict", content=data, headers={"content-type": "application/dicom"})
    octet = client.post(
        "/predict", content=data, headers={"content-type": "application/octet-stream"}
    )
    multipart = client.post("/predict", files={"file": ("image.dcm", data, "application/dicom")})
    answers = [r.json() for r in (raw, octet, multipart)]
    assert all(r.status_code == 200 for r in (raw, octet, multipart))
    assert answers[0]["probabilities"] == answers[1]["probabilities"] == answers[2]["probabilities"]
    assert answers[0]["dicom"] == answers[2]["dicom"]


def test_jpeg_and_png_answers_carry_no_dicom_object(client: TestClient) -> None:
    from tests.support.testkit import encode, xray_like

    body = client.post("/predict", files={"file": ("x.png", encode(xray_like(), "PNG"))}).json()
    assert body["dicom"] is None and body["warnings"] == []


def test_refusals_over_http_are_json_422_and_the_service_stays_ready(client: TestClient) -> None:
    data = make_dicom(ramp(), modality="CT", sop_class=CT_STORAGE)
    response = client.post("/predict", content=data, headers={"content-type": "application/dicom"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "not_intended_use"
    assert "Modality CT" in response.json()["error"]["message"]
    assert client.get("/health/ready").status_code == 200


def test_age_warning_reaches_the_response(client: TestClient) -> None:
    data = make_dicom(ramp(), patient_age="040Y")
    body = client.post("/predict", content=data, headers={"content-type": "application/dicom"})
    (warning,) = body.json()["warnings"]
    assert "training population" in warning


def test_model_info_states_the_intended_use_and_the_dicom_rule(client: TestClient) -> None:
    info = client.get("/model").json()
    assert info["intended_use"]["modalities"] == ["CR", "DX"]
    assert info["intended_use"]["training_population"]["age_years_max"] == 6.0
    assert info["preprocessing"]["dicom"]["voi_order"][-1] == "full_range"


PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_FILES = sorted(
    p
    for p in PYDICOM_DATA.rglob("*")
    if p.is_file()
    and p.suffix not in {".json", ".dump", ".txt", ".icc", ".gz"}
    and p.name != "README"
)


def test_pydicom_ships_the_files_this_test_expects() -> None:
    assert len(PYDICOM_FILES) > 120


def test_every_file_pydicom_ships_is_answered_or_refused_never_a_500(client: TestClient) -> None:
    """Files written by other tools (GDCM, DCMTK, dcm4che...): CT, MR, US, NM, RT, SEG, SR, ECG,
    secondary captures, DICOMDIRs, broken and odd ones, and three real CR images."""
    statuses: dict[str, int] = {}
    for path in PYDICOM_FILES:
        response = client.post(
            "/predict", content=path.read_bytes(), headers={"content-type": "application/dicom"}
        )
        name = str(path.relative_to(path.parents[1]))
        assert response.status_code in (200, 415, 422), (name, response.text)
        if response.status_code != 200:
            assert set(response.json()) == {"error"}, name
        statuses[name] = response.status_code
        if response.status_code == 200:
            assert response.json()["dicom"]["modality"] in ("CR", "DX"), name
    assert client.get("/health/ready").status_code == 200
    # Everything accepted is a CR/DX image; nothing else in pydicom's set is.
    accepted = sorted(name for name, status in statuses.items() if status == 200)
    for name in accepted:
        assert pydicom.dcmread(Path(pydicom.__file__).parent / "data" / name).Modality in (
            "CR",
            "DX",
        )
    non_radiographs = [n for n, s in statuses.items() if s == 422]
    assert len(non_radiographs) > 100


def test_a_real_cr_image_from_another_tool_is_read_as_a_viewer_would() -> None:
    """pydicom ships three real CR images (16x16 crops, MONOCHROME1, rescaled and windowed,
    lateral views of the cervical spine, so refused as they are). Relabelled as a frontal chest and
    with the side limit lowered, one renders as pydicom's own windowing then inversion does."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = PYDICOM_DATA / "dicomdirtests" / "77654033" / "CR1" / "6154"
    original = path.read_bytes()
    with pytest.raises(NotIntendedUse, match="CSPINE"):
        decode_upload(original, LIMITS, POLICY)
    ds = pydicom.dcmread(io.BytesIO(original))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "WindowCenter" in ds
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "AP"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoded = decode_upload(buffer.getvalue(), DecodeLimits(50_000_000, 8), POLICY)
    assert decoded.dicom is not None and decoded.dicom.window.source == "window"
    image = np.asarray(decoded.image).astype(np.int64)
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # pydicom's window output spans the rescaled range of the stored bits
    low = float(ds.RescaleIntercept)
    high = (2**ds.BitsStored - 1) * float(ds.RescaleSlope) + low
    reference = 255 - np.rint((windowed - low) / (high - low) * 255.0)
    assert np.abs(image - reference).max() <= 1
    assert image.std() > 5


# -- JPEG 2000 at a reduced resolution level (the contract's `Jpeg2000Reduction`; the parity with
# training is in tests/contract/test_train_serve_parity.py)

REDUCING = DicomPolicy(
    rendering=POLICY.rendering,
    intended_use=POLICY.intended_use,
    j2k_level=lambda width, height, levels, wavelet: min(2, levels),
)


def _large_twelve_bit() -> np.ndarray:
    rng = np.random.default_rng(5)
    return np.clip(ramp(rows=513, columns=601) + rng.normal(0, 30, (513, 601)), 0, 4095).astype(
        np.uint16
    )


@pytest.mark.parametrize("syntax", ["j2k_lossless", "j2k"])
def test_a_reduced_j2k_frame_is_the_wavelet_approximation_at_the_stored_size(syntax: str) -> None:
    stored = _large_twelve_bit()
    data = make_dicom(stored, syntax, bits_stored=12)
    decoded = decode_upload(data, LIMITS, REDUCING)
    assert decoded.image.size == (151, 129) and decoded.stored_size == (601, 513)
    # Close to the full decode averaged over 4x4 blocks (rendered by the full range of each).
    full = grey(data).astype(np.float64)
    blocks = np.pad(full, ((0, 3), (0, 3)), mode="edge")[:516, :604]
    averaged = blocks.reshape(129, 4, 151, 4).mean(axis=(1, 3))
    assert np.abs(np.asarray(decoded.image) - averaged)[2:-2, 2:-2].mean() < 3.0
    assert decode_upload(data, LIMITS, POLICY).stored_size is None


def test_a_j2k_frame_with_one_wavelet_level_is_reduced_by_one_at_most() -> None:
    import imagecodecs

    stored = _large_twelve_bit()
    ds = make_dataset(stored, bits_stored=12)
    ds.PixelData = encapsulate(
        [
            bytes(
                imagecodecs.jpeg2k_encode(
                    stored, codecformat="J2K", resolutions=2, bitspersample=12
                )
            )
        ]
    )
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = SYNTAXES["j2k_lossless"]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    assert decode_upload(buffer.getvalue(), LIMITS, REDUCING).image.size == (301, 257)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_reduced_j2k_frame_that_does_not_decode_is_a_422(damage: str) -> None:
    # the main header stays whole, so that the rule applies and the reduced decode meets the damage
    data = _damaged("j2k_lossless", damage, keep=lambda frame: frame.find(b"\xff\x90"))
    with pytest.raises(InvalidImage) as excinfo:
        decode_upload(data, LIMITS, REDUCING)
    assert excinfo.value.status_code == 422


def _damaged(syntax: str, damage: str, keep: Callable[[bytes], int]) -> bytes:
    """A 601x513 12-bit file whose frame is cut to a third ("truncated") or whose bytes after
    `keep(frame)` are replaced by 9000 random ones ("garbage")."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(_large_twelve_bit(), syntax, bits_stored=12)))
    frame = list(generate_fragments(ds.PixelData))[1]
    rng = random.Random(damage)
    kept = keep(frame)
    bad = frame[: len(frame) // 3] if damage == "truncated" else frame[:kept] + rng.randbytes(9000)
    ds.PixelData = encapsulate([bad + b"\0" * (len(bad) % 2)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- lossless frames by imagecodecs (app.imaging.lossless), exactly pydicom's values

LOSSLESS = ("jpeg_lossless", "jpeg_lossless_sv1", "jpeg_ls", "jpeg_ls_near", "j2k_lossless")


def _lossless_cases() -> dict[str, tuple[np.ndarray, dict]]:
    rng = np.random.default_rng(11)
    twelve = _large_twelve_bit()
    return {
        "12-bit": (twelve, {"bits_stored": 12}),
        "16-bit full range": (rng.integers(0, 65536, (257, 311), dtype=np.uint16), {}),
        "10-bit": ((twelve >> 2).astype(np.uint16), {"bits_stored": 10}),
        "8-bit": (rng.integers(0, 256, (129, 97), dtype=np.uint8), {}),
        "odd sizes": (twelve[:97, :131].copy(), {"bits_stored": 12}),
        "monochrome1": (twelve, {"bits_stored": 12, "photometric": "MONOCHROME1"}),
    }


@pytest.mark.parametrize("syntax", LOSSLESS)
@pytest.mark.parametrize("case", list(_lossless_cases()))
def test_a_lossless_frame_is_decoded_by_imagecodecs_exactly_as_pydicom_decodes_it(
    case: str, syntax: str
) -> None:
    """A lossless codestream decodes to the same values in every conforming decoder, so reading
    it with imagecodecs (the interpreter lock released) instead of pydicom's plugin changes no
    pixel: the values, and the rendered image, are pydicom's."""
    from app.imaging.dicom import open_dicom

    stored, options = _lossless_cases()[case]
    data = make_dicom(stored, syntax, **options)
    opened = open_dicom(data, LIMITS.max_pixels, LIMITS.min_side, POLICY)
    values = opened._lossless_values(POLICY)
    assert values is not None, "the lossless frame was left to pydicom"
    reference = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert values.dtype == reference.dtype and values.shape == reference.shape
    np.testing.assert_array_equal(values, reference)
    if syntax != "jpeg_ls_near":
        np.testing.assert_array_equal(values, stored)
    # ... and the whole decode renders what rendering pydicom's values gives
    as_native = make_dicom(reference, "explicit_le", **options)
    np.testing.assert_array_equal(
        np.asarray(decode_upload(data, LIMITS, POLICY).image),
        np.asarray(decode_upload(as_native, LIMITS, POLICY).image),
    )


@pytest.mark.parametrize(
    ("syntax", "stored", "why"),
    [
        ("j2k", _large_twelve_bit(), "lossy: training decodes it with pydicom too"),
        ("jpeg_extended", _large_twelve_bit(), "lossy"),
        ("rle", _large_twelve_bit(), "RLE is pydicom's (pylibjpeg-rle releases no lock it needs)"),
        ("j2k_lossless", (_large_twelve_bit().astype(np.int32) - 2048).astype(np.int16), "signed"),
    ],
)
def test_other_frames_stay_with_pydicom(syntax: str, stored: np.ndarray, why: str) -> None:
    from app.imaging.dicom import open_dicom

    data = make_dicom(stored, syntax, bits_stored=12)
    opened = open_dicom(data, LIMITS.max_pixels, LIMITS.min_side, POLICY)
    assert opened._lossless_values(POLICY) is None, why
    assert decode_upload(data, LIMITS, POLICY).image.size == (601, 513)


def test_a_jpeg_frame_whose_precision_disagrees_with_bits_stored_stays_with_pydicom() -> None:
    from app.imaging.dicom import open_dicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(_large_twelve_bit(), "jpeg_lossless_sv1")))
    ds.BitsStored, ds.HighBit = 12, 11  # the codestream says 16
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    opened = open_dicom(buffer.getvalue(), LIMITS.max_pixels, LIMITS.min_side, POLICY)
    assert opened._lossless_values(POLICY) is None


@pytest.mark.parametrize("syntax", LOSSLESS)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_lossless_frame_that_does_not_decode_is_a_422(syntax: str, damage: str) -> None:
    # past the SOF / SIZ, so that the frame still qualifies for imagecodecs
    data = _damaged(syntax, damage, keep=lambda frame: len(frame) // 5)
    with pytest.raises(ServiceError) as excinfo:
        decode_upload(data, LIMITS, POLICY)
    assert excinfo.value.status_code == 422
