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

from app.contract import (
    J2K_LOWPASS_SECOND_MOMENT,
    DicomRendering,
    Jpeg2000Reduction,
    JpegDctScaling,
    Preprocessing,
)
from training.dicom import J2K_APPROXIMATION, read_dicom_as_image

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
    # A lossy (9/7 wavelet) JPEG 2000 DICOM frame of a detector's size is decoded at level 2, 1/4
    # per side, then resized onto the full-size grid. The reversible 5/3 wavelet (lossless files)
    # moved answers on upscaled test images by more than 0.02 at level 2 and is decoded in full.
    dicom_j2k_reduction=Jpeg2000Reduction(min_ratio=2, max_level=2, wavelets=["9/7"]),
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


def _wavelet_taps(grey: np.ndarray, a: float) -> np.ndarray:
    """[a, 1 - 2a, a] down axis 0 of an edge-padded float64 array (one row lost at each end)."""
    out = np.empty((grey.shape[0] - 2, *grey.shape[1:]), dtype=np.float64)
    for i in range(out.shape[0]):
        out[i] = a * (grey[i] + grey[i + 2]) + (1 - 2 * a) * grey[i + 1]
    return out


def resize_j2k_approximation(image: Image.Image, spec: Preprocessing, facts: dict) -> Image.Image:
    """Step 3 for a JPEG 2000 frame decoded at level r (the rule in `Jpeg2000Reduction`): filter
    out the approximation's own second moment, then resize over the box that puts each sample
    where the full-size resize would have it, in float, and round back to 8 bits."""
    level, (width, height) = facts["level"], facts["stored_size"]
    grid = 2**level
    moment = J2K_LOWPASS_SECOND_MOMENT[facts["wavelet"]] * (grid * grid - 1) / 3
    a = -moment / (2 * grid * grid)
    grey = np.asarray(image, dtype=np.float64)
    grey = np.concatenate([grey[:1], grey, grey[-1:], grey[-1:]], axis=0)
    grey = np.concatenate([grey[:, :1], grey, grey[:, -1:], grey[:, -1:]], axis=1)
    filtered = _wavelet_taps(_wavelet_taps(grey, a).T, a).T
    start = (grid - 1) / (2 * grid)
    resized = Image.fromarray(np.ascontiguousarray(filtered, dtype=np.float32), mode="F").resize(
        (spec.width, spec.height),
        RESAMPLING[spec.resize_filter],
        box=(start, start, start + width / grid, start + height / grid),
    )
    return Image.fromarray(
        np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8), mode="L"
    )


def image_to_array(image: Image.Image, spec: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Contract steps 2-3 on a decoded image: uint8 array of shape (height, width, channels)."""
    j2k = image.info.get(J2K_APPROXIMATION)
    if j2k is not None:
        image = to_eight_bit_grey(resize_j2k_approximation(image, spec, j2k), spec.color_mode)
    else:
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
        return image_to_array(read_dicom_as_image(path, spec.dicom, spec), spec)
    with Image.open(path) as image:
        decode_at_contract_scale(image, spec)
        image.load()
        return image_to_array(image, spec)


PIXEL_MAX = 255.0  # the largest 8-bit grey value: what augmentation works in before `scale`


def equalize(levels: np.ndarray) -> np.ndarray:
    """Contract step 5 on uint8 images (N, H, W, C) or one image (H, W, C): each image and
    channel's grey levels through its own cumulative histogram, float32 in [0, 255]."""
    if levels.ndim == 3:
        return equalize(levels[np.newaxis])[0]
    n, h, w, c = levels.shape
    flat = levels.transpose(0, 3, 1, 2).reshape(n * c, h * w)
    out = np.empty(flat.shape, dtype=np.float32)
    for i, row in enumerate(flat):
        counts = np.cumsum(np.bincount(row, minlength=256))
        lowest = counts[row.min()]
        out[i] = np.float32(255) * (counts[row] - lowest).astype(np.float32)
        out[i] /= np.float32(max(h * w - lowest, 1))
    return out.reshape(n, c, h, w).transpose(0, 2, 3, 1)


def equalize_tf(pixels: Any) -> Any:
    """`equalize` in TF ops for float pixel batches in [0, PIXEL_MAX] (the augmented tf.data
    batches), first rounded to 8-bit levels as an upload would be."""
    import tensorflow as tf

    shape = tf.shape(pixels)
    n, h, w, c = shape[0], shape[1], shape[2], shape[3]
    levels = tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, PIXEL_MAX)), tf.int32)
    flat = tf.reshape(tf.transpose(levels, [0, 3, 1, 2]), [n * c, h * w])
    counts = tf.cumsum(tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1), axis=1)
    at_level = tf.gather(counts, flat, batch_dims=1)
    lowest = tf.gather(counts, tf.reduce_min(flat, axis=1), batch_dims=1)[:, tf.newaxis]
    numerator = tf.cast(at_level - lowest, tf.float32) * 255.0
    denominator = tf.cast(tf.maximum(h * w - lowest, 1), tf.float32)
    out = tf.reshape(numerator / denominator, [n, c, h, w])
    return tf.transpose(out, [0, 2, 3, 1])


def scale(pixels: Any, spec: Preprocessing = DEFAULT_PREPROCESSING) -> Any:
    """Contract steps 4 and 5, the one place training maps pixel values to model input values.

    Takes uint8 NumPy arrays, or float32 TF tensors of pixel values in [0, PIXEL_MAX] (the
    augmented tf.data batches); returns float32 of the same kind.
    """
    if isinstance(pixels, np.ndarray):
        if spec.equalization == "histogram":
            pixels = equalize(pixels.astype(np.uint8, copy=False))
        pixels = pixels.astype(np.float32)
    elif spec.equalization == "histogram":
        pixels = equalize_tf(pixels)
    return pixels * np.float32(spec.scale) + np.float32(spec.offset)
