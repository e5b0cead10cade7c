"""The preprocessing contract is implemented once per side; these tests prove the two agree.

Training (`training.preprocessing`) and serving (`app.imaging.preprocessing` after
`app.imaging.formats`) must give bit-identical model inputs for the same file, or the model is
served something it never saw.
"""

from __future__ import annotations

import io
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from app.contract import (
    J2K_LOWPASS_SECOND_MOMENT,
    Jpeg2000Reduction,
    JpegDctScaling,
    Preprocessing,
)
from app.imaging.dicom import DicomPolicy, j2k_main_header
from app.imaging.formats import DecodeLimits, decode_upload
from app.imaging.preprocessing import (
    equalized_model_input,
    j2k_reduction_level,
    jpeg_scale_denominator,
    to_model_input,
)
from app.testing.dicom_files import SYNTAXES, make_dataset, make_dicom, ramp
from tests.support.realdata import DATA_DIR, requires_data
from training.dicom import contract_j2k_level, read_dicom_as_image
from training.intended_use import PAEDIATRIC_CHEST_XRAY
from training.preprocessing import (
    DEFAULT_PREPROCESSING,
    decode_at_contract_scale,
    load_image,
    scale,
)


def _limits(spec: Preprocessing) -> DecodeLimits:
    """The limits as the service builds them for a model with this contract (DCT scaling too)."""
    return DecodeLimits(
        max_pixels=60_000_000,
        min_side=64,
        jpeg_scale=partial(jpeg_scale_denominator, spec=spec),
    )


LIMITS = _limits(DEFAULT_PREPROCESSING)
# The contract also allows quarter and eighth DCT scales; the shipped model does not use them.
EVERY_DCT_SCALE = DEFAULT_PREPROCESSING.model_copy(
    update={"jpeg_dct_scaling": JpegDctScaling(min_ratio=4, max_denominator=8)}
)


def _serving_input(data: bytes, spec: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    return to_model_input(decode_upload(data, _limits(spec)).image, spec)


def _training_input(path: Path, spec: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    return scale(load_image(path, spec), spec)[None]


@requires_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_images_preprocess_identically(split: str) -> None:
    paths = sorted((DATA_DIR / split).glob("*/*.jpeg"))
    # every test image; an even sample of train to keep the suite fast
    paths = paths if split == "test" else paths[:: max(1, len(paths) // 400)]
    assert len(paths) > 300
    for path in paths:
        np.testing.assert_array_equal(
            _serving_input(path.read_bytes()), _training_input(path), err_msg=path.name
        )


EQUALIZED = DEFAULT_PREPROCESSING.model_copy(update={"equalization": "histogram"})


@requires_data
def test_real_images_equalise_identically() -> None:
    """Step 5: training equalises inside `scale`; the service equalises the step-4 tensor on its
    way to the graph. Every test image and a sample of train, bit for bit."""
    paths = sorted(DATA_DIR.glob("test/*/*.jpeg")) + sorted(DATA_DIR.glob("train/*/*.jpeg"))[::40]
    assert len(paths) > 700
    for path in paths:
        served = equalized_model_input(_serving_input(path.read_bytes(), EQUALIZED), EQUALIZED)
        np.testing.assert_array_equal(served, _training_input(path, EQUALIZED), err_msg=path.name)


def test_equalisation_really_changes_the_input_so_the_parity_test_can_fail() -> None:
    grey = Image.fromarray(np.tile(np.arange(224, dtype=np.uint8)[:, None] // 2, (1, 224)))
    plain = to_model_input(grey, DEFAULT_PREPROCESSING)
    equalized = equalized_model_input(plain, EQUALIZED)
    assert np.abs(equalized - plain).max() > 0.4
    np.testing.assert_array_equal(equalized_model_input(plain, DEFAULT_PREPROCESSING), plain)


def test_equalisation_in_the_training_pipeline_equals_the_numpy_one() -> None:
    """The augmented tf.data batches are equalised by TF ops: the same numbers as NumPy's."""
    import tensorflow as tf

    from training.preprocessing import equalize, equalize_tf

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 224, 224, 1), dtype=np.uint8)
    images[1] = images[1] // 8 + 100  # a narrow window
    images[2] = 42  # constant: becomes 0
    from_tf = equalize_tf(tf.constant(images.astype(np.float32))).numpy()
    np.testing.assert_array_equal(from_tf, equalize(images))
    assert float(from_tf[2].max()) == 0.0


# Sizes a PACS sends, chosen to cross every DCT scale the contract can ask for (min_ratio 4 at
# 224 px): below 1792 px on the shorter side no scaling, then 1/2, 1/4 from 3584 px, 1/8 from
# 7168 px; odd sizes so that ceil(W / d) rounding is exercised, and one portrait image.
FULL_RESOLUTION_SIZES = [(1700, 1500), (2500, 2048), (2048, 2501), (3999, 3585), (7200, 7169)]


@requires_data
@pytest.mark.parametrize("size", FULL_RESOLUTION_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("spec", [DEFAULT_PREPROCESSING, EVERY_DCT_SCALE], ids=["1/2", "1/8"])
def test_full_resolution_upload_preprocesses_identically(
    size: tuple[int, int], fmt: str, spec: Preprocessing, tmp_path: Path
) -> None:
    """A full-resolution upload (as a PACS would send) becomes the same tensor on both sides."""
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    big = Image.open(source).convert("L").resize(size, Image.Resampling.BILINEAR)
    path = tmp_path / f"big.{fmt.lower()}"
    big.save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {"compress_level": 1}))
    served = _serving_input(path.read_bytes(), spec)
    np.testing.assert_array_equal(served, _training_input(path, spec))
    assert served.shape == (1, 224, 224, 1)


@pytest.mark.parametrize(
    ("size", "shipped", "every_scale"),
    [((1791, 3000), 1, 1), ((1792, 3000), 2, 2), ((3584, 3584), 2, 4), ((7168, 7300), 2, 8)],
)
def test_both_sides_pick_the_same_dct_scale(
    size: tuple[int, int], shipped: int, every_scale: int
) -> None:
    """The scale each side picks, read back from the decoded size (the rule's edges)."""
    for spec, d in ((DEFAULT_PREPROCESSING, shipped), (EVERY_DCT_SCALE, every_scale)):
        assert jpeg_scale_denominator(*size, spec) == d
        image = Image.new("L", size, 128)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG")
        with Image.open(io.BytesIO(buffer.getvalue())) as opened:
            decode_at_contract_scale(opened, spec)
            assert opened.size == (-(-size[0] // d), -(-size[1] // d))


def test_dct_scaling_really_changes_large_jpegs_so_the_parity_test_can_fail(
    tmp_path: Path,
) -> None:
    """Without the rule a 2500x2048 JPEG gives another tensor: the two sides must both apply it."""
    rng = np.random.default_rng(3)
    noisy = Image.fromarray(rng.integers(0, 256, (2048, 2500), dtype=np.uint8))
    path = tmp_path / "noisy.jpg"
    noisy.save(path, "JPEG", quality=90)
    full_size = DEFAULT_PREPROCESSING.model_copy(update={"jpeg_dct_scaling": None})
    exact = scale(load_image(path, full_size), full_size)[None]
    assert not np.array_equal(exact, _training_input(path))
    assert not np.array_equal(exact, _serving_input(path.read_bytes()))


def _large_variants() -> dict[str, tuple[Image.Image, str]]:
    """Large images in the modes a PACS export or a scanner writes, as (image, format)."""
    rng = np.random.default_rng(1)
    grey = np.asarray(
        Image.fromarray(rng.integers(0, 256, (60, 70), dtype=np.uint8)).resize(
            (2600, 1900), Image.Resampling.BICUBIC
        )
    )
    rgb = Image.fromarray(np.stack([grey, grey[::-1], grey[:, ::-1]], axis=-1))
    sixteen = Image.fromarray((grey.astype(np.uint16) * 13 + 300).astype(np.uint16))
    return {
        "RGB JPEG": (rgb, "JPEG"),
        "CMYK JPEG": (rgb.convert("CMYK"), "JPEG"),
        "16-bit PNG": (sixteen, "PNG"),
        "RGBA PNG": (rgb.convert("RGBA"), "PNG"),
    }


@pytest.mark.parametrize("name", list(_large_variants()))
def test_large_images_of_every_kind_preprocess_identically(name: str, tmp_path: Path) -> None:
    image, fmt = _large_variants()[name]
    path = tmp_path / f"large.{fmt.lower()}"
    image.save(path, fmt)
    np.testing.assert_array_equal(_serving_input(path.read_bytes()), _training_input(path))


def _variants() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    sixteen = Image.fromarray(rng.integers(100, 4000, (300, 260)).astype(np.uint16))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 3
    return {
        "L": grey,
        "RGB": rgb,
        "RGBA": rgb.convert("RGBA"),
        "LA": grey.convert("LA"),
        "P": palette,
        "I;16": sixteen,
    }


@pytest.mark.parametrize("mode", list(_variants()))
def test_every_pixel_format_preprocesses_identically(mode: str, tmp_path: Path) -> None:
    path = tmp_path / f"img-{mode.replace(';', '_')}.png"
    _variants()[mode].save(path)
    np.testing.assert_array_equal(_serving_input(path.read_bytes()), _training_input(path))


@pytest.mark.parametrize(
    "resize_filter", ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
)
def test_every_resize_filter_of_the_contract_is_the_same_filter_on_both_sides(
    resize_filter: str, tmp_path: Path
) -> None:
    """Each side maps the contract's filter names to Pillow filters with its own table."""
    spec = DEFAULT_PREPROCESSING.model_copy(update={"resize_filter": resize_filter})
    path = tmp_path / "grey.png"
    _variants()["L"].save(path)
    served = to_model_input(decode_upload(path.read_bytes(), LIMITS).image, spec)
    np.testing.assert_array_equal(served, scale(load_image(path, spec), spec)[None])


# -- DICOM: training (`training.dicom`, pixel by pixel) and serving (`app.imaging.dicom`, a lookup
# table) render every case of the contract's display pipeline to the same 8-bit image.

DICOM_POLICY = DicomPolicy(
    rendering=DEFAULT_PREPROCESSING.dicom, intended_use=PAEDIATRIC_CHEST_XRAY
)


def _dicom_cases() -> dict[str, tuple[np.ndarray, str, dict]]:
    twelve = ramp(rows=300, columns=260, high=4095)
    eight = ramp(rows=300, columns=260, high=255, dtype=np.uint8)
    signed = (twelve.astype(np.int32) - 2048).astype(np.int16)
    padded = twelve.copy()
    padded[:20] = 4095
    cases: dict[str, tuple[np.ndarray, str, dict]] = {
        f"syntax-{syntax}": (
            eight if syntax == "jpeg_baseline" else twelve,
            syntax,
            {"bits_stored": 8 if syntax == "jpeg_baseline" else 12},
        )
        for syntax in SYNTAXES
    }
    cases.update(
        {
            "8bit-full-range": (eight, "explicit_le", {}),
            "12bit-window-linear": (twelve, "explicit_le", {"window": (1800.0, 1500.0)}),
            "window-linear-exact": (
                twelve,
                "explicit_le",
                {"window": (1800.0, 1500.0), "voi_function": "LINEAR_EXACT"},
            ),
            "window-sigmoid": (
                twelve,
                "explicit_le",
                {"window": (2000.0, 900.0), "voi_function": "SIGMOID"},
            ),
            "window-multi-valued": (
                twelve,
                "explicit_le",
                {"window": ([1000.0, 3000.0], [700.0, 2000.0])},
            ),
            "window-unusable": (twelve, "explicit_le", {"window": (2000.0, 0.0)}),
            "monochrome1": (twelve, "explicit_le", {"photometric": "MONOCHROME1"}),
            "monochrome1-window": (
                twelve,
                "jpeg_ls",
                {"photometric": "MONOCHROME1", "window": (2000.0, 3000.0)},
            ),
            "presentation-inverse": (twelve, "explicit_le", {"presentation_inverse": True}),
            "monochrome1-and-inverse": (
                twelve,
                "explicit_le",
                {"photometric": "MONOCHROME1", "presentation_inverse": True},
            ),
            "rescale": (twelve, "explicit_le", {"rescale": (0.5, -100.0)}),
            "rescale-window": (
                twelve,
                "rle",
                {"rescale": (2.0, -1024.0), "window": (500.0, 3000.0)},
            ),
            "modality-lut-sequence": (
                ramp(rows=300, columns=260, high=1023),
                "explicit_le",
                {"bits_stored": 10, "modality_lut": (0, 16, [(v * 7) % 4096 for v in range(1024)])},
            ),
            "voi-lut-sequence": (
                ramp(rows=300, columns=260, high=1023),
                "explicit_le",
                {"bits_stored": 10, "voi_lut": (100, 8, [min(255, v // 3) for v in range(800)])},
            ),
            "padding-value": (padded, "explicit_le", {"padding": (4095, None)}),
            "padding-range": (padded, "explicit_le", {"padding": (4000, 4095)}),
            "signed": (signed, "explicit_le", {"window": (0.0, 3000.0)}),
            "signed-full-range": (signed, "j2k_lossless", {}),
        }
    )
    return cases


@pytest.mark.parametrize("case", list(_dicom_cases()))
def test_dicom_renders_identically_in_training_and_serving(case: str, tmp_path: Path) -> None:
    stored, syntax, options = _dicom_cases()[case]
    data = make_dicom(stored, syntax, **options)
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    served = decode_upload(data, LIMITS, DICOM_POLICY).image
    trained = read_dicom_as_image(path, DEFAULT_PREPROCESSING.dicom)
    np.testing.assert_array_equal(np.asarray(served), np.asarray(trained))
    assert len(np.unique(np.asarray(served))) > 16  # a real image, not a constant
    np.testing.assert_array_equal(
        to_model_input(served, DEFAULT_PREPROCESSING), _training_input(path)
    )


def test_dicom_rendering_agrees_with_pydicoms_reference_windowing() -> None:
    """An outside check on the formula: pydicom's own `apply_voi_lut` on the same window,
    rescaled from its output range to 8 bits, is within one grey level of ours."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = ramp(rows=300, columns=260, high=4095)
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        data = make_dicom(stored, window=(1800.0, 1500.0), voi_function=function, bits_stored=12)
        ds = pydicom.dcmread(io.BytesIO(data))
        reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        reference_8bit = np.rint(reference / 4095.0 * 255.0)
        ours = np.asarray(decode_upload(data, LIMITS, DICOM_POLICY).image).astype(np.float64)
        assert np.abs(ours - reference_8bit).max() <= 1, function


# -- JPEG 2000 at a reduced resolution level: serving (`app.imaging.dicom`, its own header reader)
# and training (`training.dicom`, another) pick the same level and give the same model input.

# A 64 px target makes every level reachable with small, quick files (min_ratio 2: level 1 from a
# 256 px shorter side, 2 from 512, 3 from 1024); the shipped-size contract is checked at 2500x2048.
J2K_EVERY_LEVEL = DEFAULT_PREPROCESSING.model_copy(
    update={
        "height": 64,
        "width": 64,
        "dicom_j2k_reduction": Jpeg2000Reduction(min_ratio=2, max_level=3),
    }
)
J2K_SHIPPED_SIZE = DEFAULT_PREPROCESSING.model_copy(
    update={"dicom_j2k_reduction": Jpeg2000Reduction(min_ratio=2, max_level=2)}
)
J2K_IRREVERSIBLE_ONLY = J2K_EVERY_LEVEL.model_copy(
    update={"dicom_j2k_reduction": Jpeg2000Reduction(min_ratio=2, max_level=3, wavelets=["9/7"])}
)


def _j2k_policy(spec: Preprocessing) -> DicomPolicy:
    return DicomPolicy(
        rendering=spec.dicom,
        intended_use=PAEDIATRIC_CHEST_XRAY,
        j2k_level=partial(j2k_reduction_level, spec=spec),
    )


def _detector_image(columns: int, rows: int, seed: int = 0) -> np.ndarray:
    """12-bit stored values with structure at every scale (a ramp, blobs and noise), so that a
    lossy codec and each wavelet level have detail to lose."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8))
    blobs = np.asarray(coarse.resize((columns, rows), Image.Resampling.BICUBIC), np.float64)
    values = (
        ramp(rows, columns, 2000).astype(np.float64) + blobs * 6 + rng.normal(0, 40, blobs.shape)
    )
    return np.clip(np.rint(values), 0, 4095).astype(np.uint16)


def _j2k_both_sides(
    data: bytes, spec: Preprocessing, tmp_path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    decoded = decode_upload(data, LIMITS, _j2k_policy(spec))
    path = tmp_path / "frame.dcm"
    path.write_bytes(data)
    served = to_model_input(decoded.image, spec, decoded.approximation)
    return served, _training_input(path, spec), decoded.image.size


J2K_CASES = {
    # (columns, rows) -> the level both sides must pick under J2K_EVERY_LEVEL
    (300, 255): 0,  # the rule does not apply: decoded in full
    (301, 256): 1,
    (601, 513): 2,  # 513 = 4k + 1: Pillow's own rounding would be a pixel short
    (1029, 1025): 3,  # 1025 = 8k + 1
}


@pytest.mark.parametrize("syntax", ["j2k_lossless", "j2k"])
@pytest.mark.parametrize("size", list(J2K_CASES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_j2k_at_a_reduced_level_preprocesses_identically(
    size: tuple[int, int], syntax: str, tmp_path: Path
) -> None:
    level = J2K_CASES[size]
    data = make_dicom(_detector_image(*size), syntax, window=(2100.0, 3000.0), bits_stored=12)
    served, trained, decoded_size = _j2k_both_sides(data, J2K_EVERY_LEVEL, tmp_path)
    np.testing.assert_array_equal(served, trained)
    assert decoded_size == (-(-size[0] >> level), -(-size[1] >> level))
    assert len(np.unique(served)) > 32  # a real image, not a constant


@pytest.mark.parametrize(
    ("case", "stored", "options"),
    [
        ("signed", "signed", {"window": (0.0, 3000.0)}),
        ("signed-full-range", "signed", {}),
        ("8-bit", "eight", {"bits_stored": 8}),
        ("monochrome1-padding", "twelve", {"photometric": "MONOCHROME1", "padding": (0, None)}),
        ("voi-lut", "twelve", {"voi_lut": (0, 8, [v // 16 for v in range(4096)])}),
    ],
)
def test_j2k_rendering_cases_at_a_reduced_level_preprocess_identically(
    case: str, stored: str, options: dict, tmp_path: Path
) -> None:
    twelve = _detector_image(601, 513, seed=1)
    twelve[:, :40] = 0  # a padded border
    pixels = {
        "twelve": twelve,
        "signed": (twelve.astype(np.int32) - 2048).astype(np.int16),
        "eight": (twelve >> 4).astype(np.uint8),
    }[stored]
    options = {"bits_stored": 12, **options}
    data = make_dicom(pixels, "j2k_lossless", **options)
    served, trained, decoded_size = _j2k_both_sides(data, J2K_EVERY_LEVEL, tmp_path)
    np.testing.assert_array_equal(served, trained)
    assert decoded_size == (151, 129)  # level 2
    assert len(np.unique(served)) > 16


def _j2k_frame_dicom(stored: np.ndarray, frame: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    ds = make_dataset(stored, bits_stored=12, window=(2100.0, 3000.0))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = SYNTAXES["j2k_lossless"]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("resolutions", [2, 3])
def test_the_level_never_exceeds_the_codestreams_own_decomposition_levels(
    resolutions: int, tmp_path: Path
) -> None:
    """A frame with one (or two) wavelet levels is reduced by at most that many, on both sides."""
    import imagecodecs

    stored = _detector_image(1029, 1025)
    frame = bytes(
        imagecodecs.jpeg2k_encode(
            stored, codecformat="J2K", resolutions=resolutions, bitspersample=12
        )
    )
    header = j2k_main_header(frame)
    assert header is not None and header.decomposition_levels == resolutions - 1
    assert header.precision == 12 and not header.signed
    served, trained, decoded_size = _j2k_both_sides(
        _j2k_frame_dicom(stored, frame), J2K_EVERY_LEVEL, tmp_path
    )
    np.testing.assert_array_equal(served, trained)
    level = resolutions - 1
    assert decoded_size == (-(-1029 >> level), -(-1025 >> level))


@pytest.mark.parametrize("syntax", ["j2k_lossless", "j2k"])
def test_a_2500x2048_j2k_frame_is_reduced_identically_under_the_shipped_size_rule(
    syntax: str, tmp_path: Path
) -> None:
    data = make_dicom(
        _detector_image(2048, 2500, seed=2), syntax, window=(2100.0, 3000.0), bits_stored=12
    )
    served, trained, decoded_size = _j2k_both_sides(data, J2K_SHIPPED_SIZE, tmp_path)
    np.testing.assert_array_equal(served, trained)
    assert decoded_size == (512, 625)
    assert served.shape == (1, 224, 224, 1)


def test_j2k_reduction_really_changes_the_input_so_the_parity_tests_can_fail(
    tmp_path: Path,
) -> None:
    """The reduced decode gives another tensor than the full one, and dropping the rule on
    either side alone breaks parity."""
    data = make_dicom(
        _detector_image(601, 513), "j2k_lossless", window=(2100.0, 3000.0), bits_stored=12
    )
    full = J2K_EVERY_LEVEL.model_copy(update={"dicom_j2k_reduction": None})
    reduced_served, reduced_trained, _ = _j2k_both_sides(data, J2K_EVERY_LEVEL, tmp_path)
    full_served, full_trained, size = _j2k_both_sides(data, full, tmp_path)
    assert size == (601, 513)
    np.testing.assert_array_equal(full_served, full_trained)
    assert not np.array_equal(reduced_served, full_served)
    assert not np.array_equal(reduced_trained, full_trained)


@pytest.mark.parametrize(
    "spec", [J2K_EVERY_LEVEL, J2K_SHIPPED_SIZE, J2K_IRREVERSIBLE_ONLY, DEFAULT_PREPROCESSING]
)
def test_both_sides_pick_the_same_j2k_level(spec: Preprocessing) -> None:
    """The two implementations of the rule agree on every size around each level's edge, every
    decomposition-level cap and both wavelets."""
    rule = spec.dicom_j2k_reduction
    needed = (rule.min_ratio if rule else 1) * max(spec.height, spec.width)
    sides = sorted({max(1, (needed << r) + d) for r in range(5) for d in (-1, 0, 1)})
    for shorter in sides:
        for longer in (shorter, shorter + 777):
            for levels in range(6):
                for width, height in ((longer, shorter), (shorter, longer)):
                    for wavelet in ("5/3", "9/7"):
                        served = j2k_reduction_level(width, height, levels, wavelet, spec)
                        trained = contract_j2k_level(width, height, levels, wavelet, spec)
                        assert served == trained, (width, height, levels, wavelet)
                        assert served <= min(levels, rule.max_level if rule else 0)
                        assert served == 0 or (needed << served) <= shorter
                        if rule is None or wavelet not in rule.wavelets:
                            assert served == 0


# One level's analysis low-pass filters as ITU-T T.800 gives them: the reversible 5/3 (F.3.8.2)
# and the irreversible 9/7 (Table F.4), written out here independently of the contract's figures.
_LOWPASS_5_3 = {0: 6 / 8, 1: 2 / 8, 2: -1 / 8}
_LOWPASS_9_7 = {
    0: 0.602949018236,
    1: 0.266864118443,
    2: -0.078223266529,
    3: -0.016864118443,
    4: 0.026748757411,
}


@pytest.mark.parametrize(("wavelet", "taps"), [("5/3", _LOWPASS_5_3), ("9/7", _LOWPASS_9_7)])
def test_the_contracts_low_pass_moments_are_the_standards_filters(
    wavelet: str, taps: dict[int, float]
) -> None:
    gain = taps[0] + 2 * sum(v for k, v in taps.items() if k)
    moment = 2 * sum(v * k * k for k, v in taps.items()) / gain
    assert gain == pytest.approx(1.0, abs=1e-9)
    assert J2K_LOWPASS_SECOND_MOMENT[wavelet] == pytest.approx(moment, abs=1e-6)


@pytest.mark.parametrize(("reversible", "wavelet"), [(True, "5/3"), (False, "9/7")])
def test_the_wavelet_comes_from_the_codestream_not_the_transfer_syntax(
    reversible: bool, wavelet: str, tmp_path: Path
) -> None:
    """Both sides read the transformation from COD (here under the lossless syntax's UID, which
    a 9/7 codestream can carry), and agree on the input either way."""
    import imagecodecs

    stored = _detector_image(601, 513)
    frame = bytes(
        imagecodecs.jpeg2k_encode(
            stored, codecformat="J2K", reversible=reversible, bitspersample=12
        )
    )
    header = j2k_main_header(frame)
    assert header is not None and header.wavelet == wavelet
    data = _j2k_frame_dicom(stored, frame)
    decoded = decode_upload(data, LIMITS, _j2k_policy(J2K_EVERY_LEVEL))
    assert decoded.approximation is not None and decoded.approximation.wavelet == wavelet
    served, trained, _ = _j2k_both_sides(data, J2K_EVERY_LEVEL, tmp_path)
    np.testing.assert_array_equal(served, trained)
    # A rule for the 9/7 wavelet only leaves a 5/3 codestream in full, on both sides.
    served, trained, size = _j2k_both_sides(data, J2K_IRREVERSIBLE_ONLY, tmp_path)
    np.testing.assert_array_equal(served, trained)
    assert size == ((151, 129) if wavelet == "9/7" else (601, 513))


@pytest.mark.parametrize("syntax", ["j2k_lossless", "j2k"])
@pytest.mark.parametrize("size", [(301, 256), (601, 513), (1029, 1025)], ids=str)
def test_the_reduced_frame_is_resized_onto_the_full_size_grid(
    size: tuple[int, int], syntax: str
) -> None:
    """Against decoding in full: the shifted box and the moment taps bring the model input within
    a fraction of a grey level, where resizing the approximation as it comes is off by about one,
    and the codestream's own wavelet does better than the other one's moment would."""
    full = J2K_EVERY_LEVEL.model_copy(update={"dicom_j2k_reduction": None})
    data = make_dicom(_detector_image(*size), syntax, window=(2100.0, 3000.0), bits_stored=12)
    reference = to_model_input(decode_upload(data, LIMITS, _j2k_policy(full)).image, full)
    decoded = decode_upload(data, LIMITS, _j2k_policy(J2K_EVERY_LEVEL))
    approximation = decoded.approximation
    assert approximation is not None and approximation.stored_size == size

    def grey_levels_off(tensor: np.ndarray) -> float:
        return float(np.abs(tensor - reference).mean() * 255)

    aligned = grey_levels_off(to_model_input(decoded.image, J2K_EVERY_LEVEL, approximation))
    as_it_comes = grey_levels_off(to_model_input(decoded.image, J2K_EVERY_LEVEL))
    other = replace(approximation, wavelet="9/7" if approximation.wavelet == "5/3" else "5/3")
    wrong_moment = grey_levels_off(to_model_input(decoded.image, J2K_EVERY_LEVEL, other))
    assert aligned < 0.25 and as_it_comes > 0.8, (aligned, as_it_comes)
    assert aligned < wrong_moment, (aligned, wrong_moment)
