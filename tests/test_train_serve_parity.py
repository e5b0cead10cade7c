"""The preprocessing contract is implemented once per side; these tests prove the two agree.

Training (`training.preprocessing`) and serving (`app.preprocessing` after `app.decoding`) must give
bit-identical model inputs for the same file, or the model is served something it never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.decoding import DecodeLimits, decode_upload
from app.preprocessing import to_model_input
from tests.realdata import DATA_DIR, requires_data
from training.preprocessing import DEFAULT_PREPROCESSING, load_image, scale

LIMITS = DecodeLimits(max_pixels=60_000_000, min_side=64)


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


@requires_data
def test_full_resolution_upload_preprocesses_identically(tmp_path: Path) -> None:
    """A 2000 px upload (as a PACS would send) goes through the same resize on both sides."""
    source = sorted((DATA_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    big = Image.open(source).convert("L").resize((2000, 1700), Image.Resampling.BICUBIC)
    path = tmp_path / "big.png"
    big.save(path)
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
