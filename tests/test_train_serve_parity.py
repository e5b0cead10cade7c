"""The preprocessing contract is implemented once per side; these tests prove the two agree.

Training (`training.preprocessing`) and serving (`app.preprocessing` after `app.decoding`) must give
bit-identical model inputs for the same file, or the model is served something it never saw.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.decoding import DecodeLimits, decode_upload
from app.preprocessing import jpeg_scale_denominator, to_model_input
from tests.realdata import DATA_DIR, requires_data
from training.preprocessing import DEFAULT_PREPROCESSING, load_image, scale

# The limits as the service builds them for a model with this contract (DCT scaling included).
LIMITS = DecodeLimits(
    max_pixels=60_000_000,
    min_side=64,
    jpeg_scale=partial(jpeg_scale_denominator, spec=DEFAULT_PREPROCESSING),
)


def _serving_input(data: bytes) -> np.ndarray:
    return to_model_input(decode_upload(data, LIMITS).image, DEFAULT_PREPROCESSING)


def _training_input(path: Path) -> np.ndarray:
    return scale(load_image(path, DEFAULT_PREPROCESSING), DEFAULT_PREPROCESSING)[None]


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


# Sizes a PACS sends, chosen to cross every DCT scale of the contract (min_ratio 4 at 224 px):
# below 1792 px on the shorter side no scaling, then 1/2, 1/4 from 3584 px, 1/8 from 7168 px;
# odd sizes so that ceil(W / d) rounding is exercised, and one portrait image.
FULL_RESOLUTION_SIZES = [(1700, 1500), (2500, 2048), (2048, 2501), (3999, 3585), (7200, 7169)]


@requires_data
@pytest.mark.parametrize("size", FULL_RESOLUTION_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_full_resolution_upload_preprocesses_identically(
    size: tuple[int, int], fmt: str, tmp_path: Path
) -> None:
    """A full-resolution upload (as a PACS would send) becomes the same tensor on both sides."""
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    big = Image.open(source).convert("L").resize(size, Image.Resampling.BILINEAR)
    path = tmp_path / f"big.{fmt.lower()}"
    big.save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {"compress_level": 1}))
    served = _serving_input(path.read_bytes())
    np.testing.assert_array_equal(served, _training_input(path))
    assert served.shape == (1, 224, 224, 1)


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
