"""The training side of the preprocessing contract (see `app.contract.Preprocessing`).

The service implements the same steps independently in `app.imaging.preprocessing`; a test on real
images proves the two agree bit for bit. Images are decoded once with Pillow into uint8 arrays, so
that the tf.data pipeline only augments and never re-implements decoding or resizing with TF ops
(whose resize kernels differ from Pillow's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from app.contract import DicomRendering, JpegDctScaling, Preprocessing

# The contract's filter names as Pillow filters: training's own table, so that a wrong entry on
# either side makes the train/serve parity test fail instead of being shared by both.
RESAMPLING: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# One default contract for every architecture: X-rays are grey, and a single channel keeps the
# default network small. Architectures wanting three channels (ImageNet weights) repeat it in-graph.
DEFAULT_PREPROCESSING = Preprocessing(
    color_mode="grayscale",
    height=224,
    width=224,
    resize_filter="bilinear",
    resize_mode="stretch",
    scale=1.0 / 255.0,
    offset=0.0,
    high_bit_depth="minmax",
    # DICOM as a radiology viewer shows it: the file's first window (or VOI LUT), else its full
    # range without padding; MONOCHROME1 inverted so that air is dark, as in the JPEG training data.
    dicom=DicomRendering(
        voi_order=["window", "voi_lut_sequence", "full_range"],
        window_index=0,
        full_range_excludes_padding=True,
        invert="monochrome1_or_presentation_inverse",
        padding_value=0,
    ),
    # A full-resolution JPEG (a 2500x2048 detector image) is decoded at half scale when its shorter
    # side keeps at least 4x the 224 px target. Quarter and eighth scales moved the model's answers
    # on upscaled test images by more than 0.02 (docs/PERFORMANCE.md); 224 px inputs are not
    # affected.
    jpeg_dct_scaling=JpegDctScaling(min_ratio=4, max_denominator=2),
)


def stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Linearly map an array's own [min, max] onto [0, 255] (the contract's `minmax` rule)."""
    pixels = pixels.astype(np.float64)
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_eight_bit_grey(image: Image.Image, color_mode: str = "grayscale") -> Image.Image:
    """Bring any Pillow image to an 8-bit `L` (or `RGB`) image following the contract."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(stretch_to_uint8(np.asarray(image)), mode="L")
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in (
        "RGBA",
        "LA",
        "PA",
        "P",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "RGBX",
        "RGBa",
        "La",
    ):
        image = image.convert("RGB") if image.mode != "LA" else image.convert("L")
    return image.convert("L" if color_mode == "grayscale" else "RGB")


def image_to_array(image: Image.Image, spec: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Contract steps 2-3 on a decoded image: uint8 array of shape (height, width, channels)."""
    image = to_eight_bit_grey(ImageOps.exif_transpose(image), spec.color_mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), RESAMPLING[spec.resize_filter])
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode_at_contract_scale(image: Image.Image, spec: Preprocessing) -> None:
    """Contract step 1 for JPEGs: pick the DCT scale 1/d from the stored size and ask libjpeg for
    it before the pixels are decoded (`jpeg_dct_scaling`; other formats decode at full size)."""
    rule = spec.jpeg_dct_scaling
    if rule is None or image.format not in ("JPEG", "MPO"):
        return
    width, height = image.size
    allowed = min(width, height) // (rule.min_ratio * max(spec.height, spec.width))
    for d in (8, 4, 2):
        if rule.max_denominator >= d and allowed >= d:
            image.draft(image.mode, (width // d, height // d))
            assert image.size == (math.ceil(width / d), math.ceil(height / d)), image.size
            return


def load_image(path: Path, spec: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Decode a JPEG/PNG file (or a DICOM file, by extension) to the contract's uint8 array."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        from training.dicom import read_dicom_as_image

        return image_to_array(read_dicom_as_image(path, spec.dicom, spec), spec)
    with Image.open(path) as image:
        decode_at_contract_scale(image, spec)
        image.load()
        return image_to_array(image, spec)


PIXEL_MAX = 255.0  # the largest 8-bit grey value: what augmentation works in before `scale`


def scale(pixels: Any, spec: Preprocessing = DEFAULT_PREPROCESSING) -> Any:
    """Contract step 4, the one place training maps pixel values to model input values.

    Takes uint8 NumPy arrays, or float32 TF tensors of pixel values in [0, PIXEL_MAX] (the
    augmented tf.data batches); returns float32 of the same kind.
    """
    if isinstance(pixels, np.ndarray):
        pixels = pixels.astype(np.float32)
    return pixels * np.float32(spec.scale) + np.float32(spec.offset)
