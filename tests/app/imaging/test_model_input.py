"""to_model_input against the preprocessing contract in the metadata."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.contract import Preprocessing
from app.imaging.preprocessing import RESAMPLING, stretch_to_uint8, to_8bit, to_model_input
from tests.support.testkit import DICOM_RENDERING, xray_like


def spec(**overrides) -> Preprocessing:
    values = {"height": 224, "width": 224, "dicom": DICOM_RENDERING}
    values.update(overrides)
    return Preprocessing(**values)


def reference(image: Image.Image, p: Preprocessing) -> np.ndarray:
    """The contract written out longhand for an 8-bit grey image."""
    resized = image.resize((p.width, p.height), RESAMPLING[p.resize_filter])
    pixels = np.asarray(resized, dtype=np.float32)[np.newaxis, :, :, np.newaxis]
    return pixels * np.float32(p.scale) + np.float32(p.offset)


def test_shape_dtype_and_range_follow_the_metadata():
    x = to_model_input(xray_like((1000, 800)), spec())
    assert x.shape == (1, 224, 224, 1)
    assert x.dtype == np.float32
    assert 0.0 <= x.min() < x.max() <= 1.0


def test_size_comes_from_the_metadata_not_a_constant():
    x = to_model_input(xray_like(), spec(height=96, width=128))
    assert x.shape == (1, 96, 128, 1)


def test_scale_and_offset_are_applied_exactly():
    image = xray_like()
    p = spec(scale=2 / 255, offset=-1.0)
    x = to_model_input(image, p)
    np.testing.assert_array_equal(x, reference(image, p))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == pytest.approx(-1.0)  # black (0) maps to the offset


@pytest.mark.parametrize("resize_filter", sorted(RESAMPLING))
def test_resize_filter_is_the_one_the_metadata_names(resize_filter):
    image = xray_like((517, 389))
    p = spec(resize_filter=resize_filter)
    np.testing.assert_array_equal(to_model_input(image, p), reference(image, p))


def test_filters_really_differ_so_the_filter_test_can_fail():
    image = xray_like((517, 389))
    nearest = to_model_input(image, spec(resize_filter="nearest"))
    bilinear = to_model_input(image, spec(resize_filter="bilinear"))
    assert np.abs(nearest - bilinear).max() > 0.01


def test_aspect_ratio_is_stretched_not_padded():
    wide = Image.new("L", (800, 200), 255)
    x = to_model_input(wide, spec())
    assert x.min() == pytest.approx(1.0)  # no padding border anywhere


def test_rgb_uses_itu_601_luma():
    rgb = Image.new("RGB", (100, 100), (200, 40, 10))
    x = to_model_input(rgb, spec(height=100, width=100, resize_filter="nearest"))
    luma = (200 * 299 + 40 * 587 + 10 * 114) / 1000
    assert x[0, 0, 0, 0] * 255 == pytest.approx(round(luma), abs=1)


def test_alpha_is_dropped_not_composited():
    rgb = xray_like().convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(0)  # fully transparent
    la = xray_like().convert("LA")
    la.putalpha(0)
    np.testing.assert_array_equal(to_model_input(rgba, spec()), to_model_input(rgb, spec()))
    np.testing.assert_array_equal(to_model_input(la, spec()), to_model_input(xray_like(), spec()))


def test_cmyk_and_palette_go_through_rgb():
    rgb = xray_like().convert("RGB")
    cmyk = rgb.convert("CMYK")
    palette = rgb.convert("P")
    np.testing.assert_array_equal(
        to_model_input(cmyk, spec()), to_model_input(cmyk.convert("RGB"), spec())
    )
    np.testing.assert_array_equal(
        to_model_input(palette, spec()), to_model_input(palette.convert("RGB"), spec())
    )


def test_one_bit_images_become_black_and_white():
    bits = xray_like().convert("1")
    assert set(np.unique(np.asarray(to_8bit(bits, "grayscale")))) <= {0, 255}


def test_high_bit_depth_is_stretched_from_its_own_min_max():
    values = np.array([[1000, 2000], [3000, 1500]], dtype=np.uint16)
    stretched = np.asarray(stretch_to_uint8(Image.fromarray(values)))
    np.testing.assert_array_equal(stretched, [[0, 128], [255, 64]])


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_every_high_bit_mode_is_stretched(mode):
    values = np.tile(np.linspace(0, 4095, 100), (100, 1))
    image = Image.fromarray(values.astype(np.uint16)).convert(mode)
    grey = to_8bit(image, "grayscale")
    assert grey.mode == "L"
    assert np.asarray(grey).min() == 0 and np.asarray(grey).max() == 255


def test_constant_high_bit_image_becomes_zeros():
    flat = Image.fromarray(np.full((80, 80), 777, dtype=np.uint16))
    assert np.asarray(stretch_to_uint8(flat)).max() == 0


def test_rgb_color_mode_gives_three_channels():
    x = to_model_input(xray_like(), spec(color_mode="rgb"))
    assert x.shape == (1, 224, 224, 3)
    # A grey source stays grey: all three channels equal.
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_histogram_equalisation_undoes_a_tone_curve_applied_before_it() -> None:
    """Contract step 5: a strictly increasing tone curve on the upload leaves the graph's input
    unchanged (up to 8-bit merging of levels, none here: the curve keeps 64 distinct levels)."""
    from app.imaging.preprocessing import equalized_model_input

    contract = spec(equalization="histogram")
    ramp = np.tile((np.arange(224) // 3.5).astype(np.uint8)[:, None] * 2 + 60, (1, 224))
    curved = np.round(255 * (ramp / 255.0) ** 0.7).astype(np.uint8)
    assert len(np.unique(curved)) == len(np.unique(ramp))
    inputs = [
        equalized_model_input(to_model_input(Image.fromarray(a), contract), contract)
        for a in (ramp, curved)
    ]
    np.testing.assert_array_equal(inputs[0], inputs[1])
    assert inputs[0].min() == 0.0 and inputs[0].max() == pytest.approx(1.0)
