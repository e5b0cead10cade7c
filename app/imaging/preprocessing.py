"""A decoded image -> the model's input tensor, exactly as `models/*.json` prescribes.

This is the serving half of the preprocessing contract (`app.contract.Preprocessing`); training
implements the same steps independently and a test compares the two on real images. Nothing here
is a constant: size, colour mode, resize filter and scaling all come from the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from app.contract import J2K_LOWPASS_SECOND_MOMENT, Preprocessing

# Modes with more than 8 bits per sample: 16-bit PNGs open as I;16*, some tools write I or F.
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

RESAMPLING: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# Rows per slice when stretching a high-bit-depth image: about a megapixel, so the float64
# working copy stays near 8 MB however large the image is.
_STRETCH_SLICE_PIXELS = 1 << 20
_DCT_SCALES = (8, 4, 2)


def jpeg_scale_denominator(width: int, height: int, spec: Preprocessing) -> int:
    """The contract's DCT scaling for a JPEG stored as width x height: 8, 4, 2, or 1 (none)."""
    rule = spec.jpeg_dct_scaling
    if rule is None:
        return 1
    needed = rule.min_ratio * max(spec.height, spec.width)
    shorter = min(width, height)
    allowed = (d for d in _DCT_SCALES if d <= rule.max_denominator)
    return next((d for d in allowed if d * needed <= shorter), 1)


def j2k_reduction_level(
    width: int, height: int, decomposition_levels: int, wavelet: str, spec: Preprocessing
) -> int:
    """The contract's resolution level for a JPEG 2000 frame stored as width x height whose
    codestream has `decomposition_levels` levels of the `wavelet` ("5/3" or "9/7"): 3, 2, 1, or 0
    (full resolution)."""
    rule = spec.dicom_j2k_reduction
    if rule is None or wavelet not in rule.wavelets:
        return 0
    needed = rule.min_ratio * max(spec.height, spec.width)
    shorter = min(width, height)
    allowed = (r for r in (3, 2, 1) if r <= min(rule.max_level, decomposition_levels))
    return next((r for r in allowed if (needed << r) <= shorter), 0)


@dataclass(frozen=True)
class WaveletApproximation:
    """A JPEG 2000 frame decoded at resolution level `level` (`Jpeg2000Reduction`) with the
    codestream's `wavelet` ("5/3" or "9/7"), stored as `stored_size` (width, height)."""

    level: int
    wavelet: str
    stored_size: tuple[int, int]


def resize_approximation(
    image: Image.Image, spec: Preprocessing, approximation: WaveletApproximation
) -> Image.Image:
    """Contract step 3 for an 8-bit grey frame decoded at a reduced resolution level: resize it
    so that it samples the stored grid where the full-size resize would, through a filter of the
    same spread (the rule in `Jpeg2000Reduction`'s docstring).

    Sample n of level r is the low-pass output at stored position 2**r * n, where an average over
    its 2**r stored pixels would sit (2**r - 1) / 2 pixels further on: the resize box is shifted
    by that much (in reduced pixels, (2**r - 1) / 2**(r + 1)) and spans the stored size / 2**r.
    The approximation's own low-pass adds its second moment to the resize filter's; a 3-tap
    [a, 1 - 2a, a] per axis on the reduced grid (second moment 2a reduced pixels squared, so
    a = -moment / (2 * 4**r)) takes it away again. The result is rounded back to 8 bits."""
    if image.mode != "L":
        raise ValueError(f"a reduced JPEG 2000 frame renders as 8-bit grey, not {image.mode}")
    side = 1 << approximation.level
    moment = J2K_LOWPASS_SECOND_MOMENT[approximation.wavelet] * (side * side - 1) / 3
    a = -moment / (2 * side * side)
    # One edge pixel before and two after: the taps need one either side, the shifted box one more.
    padded = np.pad(np.asarray(image, dtype=np.float64), ((1, 2), (1, 2)), mode="edge")
    rows = a * (padded[:-2] + padded[2:]) + (1 - 2 * a) * padded[1:-1]
    both = a * (rows[:, :-2] + rows[:, 2:]) + (1 - 2 * a) * rows[:, 1:-1]
    shift = (side - 1) / (2 * side)
    width, height = approximation.stored_size
    box = (shift, shift, shift + width / side, shift + height / side)
    resized = Image.fromarray(both.astype(np.float32), mode="F").resize(
        (spec.width, spec.height), RESAMPLING[spec.resize_filter], box=box
    )
    grey = np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def stretch_to_uint8(image: Image.Image) -> Image.Image:
    """Map a >8-bit image linearly from its own [min, max] to [0, 255] ("L" mode).

    value_8bit = round((v - min) * 255 / (max - min)), rounding half to even, computed in float64;
    a constant image becomes all zeros. Min/max stretching (rather than a fixed >> 8) is what makes
    a 12-bit detector image stored in a 16-bit PNG look like the 8-bit JPEGs the model learned on.

    Memory: the float64 arithmetic runs one slice of rows at a time into the uint8 result, so a
    7000x7000 16-bit image costs its own 98 MB plus 49 MB for the result, not gigabytes of copies.
    """
    width, height = image.size
    rows = max(1, _STRETCH_SLICE_PIXELS // width)
    bands = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        return np.asarray(image.crop((0, top, width, bottom)))

    extremes = np.array(
        [(b.min(), b.max()) for b in (band(top, bottom) for top, bottom in bands)], np.float64
    )
    if not np.all(np.isfinite(extremes)):
        raise ValueError("image contains non-finite sample values")
    lo, hi = float(extremes[:, 0].min()), float(extremes[:, 1].max())
    stretched = np.zeros((height, width), dtype=np.uint8)
    if hi > lo:
        factor = 255.0 / (hi - lo)
        for top, bottom in bands:
            values = band(top, bottom).astype(np.float64)
            stretched[top:bottom] = np.rint((values - lo) * factor).astype(np.uint8)
    return Image.fromarray(stretched)  # 2-D uint8 -> mode "L", sharing the array's memory


# Modes whose `convert("L")` equals `convert("RGB").convert("L")` exactly (palette transparency and
# alpha are ignored either way); the parity tests hold both sides to it.
_DIRECT_TO_GREY = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK"})


def to_8bit(image: Image.Image, color_mode: str) -> Image.Image:
    """Bring any decoded mode to 8-bit "L" (grayscale) or "RGB", dropping alpha.

    Grey comes from Pillow's `convert("L")` (ITU-R 601-2 luma) applied to the RGB values; alpha is
    discarded, not composited, because a transparent X-ray region has no meaningful background.
    """
    if image.mode in HIGH_BIT_DEPTH_MODES:
        grey = stretch_to_uint8(image)
        return grey if color_mode == "grayscale" else grey.convert("RGB")
    if color_mode == "grayscale" and image.mode in _DIRECT_TO_GREY:
        # Pillow's direct conversion gives the same luma as going through RGB, bit for bit, without
        # the full-size RGB(A) copies (a 50-megapixel RGBA PNG would need 350 MB more).
        return image.convert("L")
    if image.mode in ("P", "PA"):
        # Expand the palette; a transparent palette entry becomes alpha, dropped below.
        image = image.convert("RGBA")
    if image.mode in ("1", "L", "LA"):
        grey = image if image.mode == "L" else image.convert("L")
        return grey if color_mode == "grayscale" else grey.convert("RGB")
    # RGB, RGBA, RGBX, CMYK, YCbCr, ...: to RGB (drops alpha, inverts CMYK), then to luma.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.convert("L") if color_mode == "grayscale" else rgb


def _upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation. `ImageOps.exif_transpose` copies an image that
    needs no turning (most of them), a full-size copy a 50-megapixel upload cannot afford."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return image
    turned = ImageOps.exif_transpose(image)
    assert turned is not None  # not in place: always an image
    return turned


def to_model_input(
    image: Image.Image, spec: Preprocessing, approximation: WaveletApproximation | None = None
) -> np.ndarray:
    """The model input for one decoded image: float32 of shape (1, height, width, channels).

    Steps (the contract in `Preprocessing`'s docstring): apply EXIF orientation; bring to 8-bit grey
    (or RGB); resize to (width, height) with the metadata's Pillow filter, ignoring aspect ratio
    (a JPEG 2000 frame decoded at a reduced level, `approximation`, by `resize_approximation`);
    then `uint8 * scale + offset` in float32.
    """
    if approximation is not None:  # a rendered DICOM frame: 8-bit grey, no EXIF
        resized = to_8bit(resize_approximation(image, spec, approximation), spec.color_mode)
    else:
        eight_bit = to_8bit(_upright(image), spec.color_mode)
        resized = eight_bit.resize((spec.width, spec.height), RESAMPLING[spec.resize_filter])
    pixels = np.asarray(resized, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    scaled = pixels * np.float32(spec.scale) + np.float32(spec.offset)
    return scaled[np.newaxis, ...].astype(np.float32, copy=False)


def equalized_model_input(tensor: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """The contract's step 5 for a batch of step-4 tensors (N, H, W, C) float32: what the graph
    receives. Without `equalization` the tensor itself; with "histogram", each image's and
    channel's grey levels (recovered exactly from `uint8 * scale + offset`) through its own
    cumulative histogram, then step 4's scaling again."""
    if spec.equalization == "none":
        return tensor
    levels = np.rint((tensor - np.float32(spec.offset)) / np.float32(spec.scale))
    levels = np.clip(levels, 0, 255).astype(np.intp)
    n, h, w, c = levels.shape
    out = np.empty(levels.shape, dtype=np.float32)
    for i in range(n):
        for k in range(c):
            grey = levels[i, :, :, k]
            at_or_below = np.cumsum(np.bincount(grey.ravel(), minlength=256))
            darkest = int(at_or_below[grey.min()])
            numerator = (255 * (at_or_below[grey] - darkest)).astype(np.float32)
            out[i, :, :, k] = numerator / np.float32(max(h * w - darkest, 1))
    return out * np.float32(spec.scale) + np.float32(spec.offset)
