"""Where the model looked: exact class activation maps (CAM) and the pictures that show them.

For a network ending in global average pooling then one dense layer, the class score is
logit_c = b_c + sum_k w[k, c] * mean_ij f_k(i, j), so CAM_c(i, j) = sum_k w[k, c] * f_k(i, j) splits
the score over the image exactly: its spatial mean is logit_c - b_c. The feature map comes from the
model's `cam_features` output, the weights from the metadata (`CamSpec`). Nothing is approximated
or learned here; the picture only upsamples and colours the map.

The map is min-max normalised over the image before colouring, so its colours say where the
evidence for the class is relatively strongest, not how strong it is: read it beside the
probability, never instead of it.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.contract import CamSpec, OutputSpec

# Control points of the colour scale (position, R, G, B): dark blue, cyan, yellow, red.
_COLOUR_STOPS = np.array(
    [
        (0.00, 0, 0, 96),
        (0.25, 0, 96, 255),
        (0.50, 0, 224, 224),
        (0.75, 255, 224, 0),
        (1.00, 224, 0, 0),
    ],
    dtype=np.float64,
)
DEFAULT_OPACITY = 0.45


@dataclass(frozen=True)
class ClassActivationMap:
    class_index: int
    grid: np.ndarray  # (h, w) float64, the raw map in logit units
    bias: float

    @property
    def normalised(self) -> np.ndarray:
        """The map scaled to [0, 1] over this image (all zeros when it is flat)."""
        lo, hi = float(self.grid.min()), float(self.grid.max())
        if hi <= lo:
            return np.zeros_like(self.grid)
        return (self.grid - lo) / (hi - lo)

    @property
    def logit(self) -> float:
        """The class logit the map accounts for: its spatial mean plus the bias."""
        return float(self.grid.mean()) + self.bias


def class_activation_map(
    features: np.ndarray, spec: CamSpec, output: OutputSpec, class_index: int
) -> ClassActivationMap:
    """CAM for one image from its feature map (C, h, w) or (h, w, C) as `output.layout` says."""
    maps = features if output.layout == "NCHW" else np.moveaxis(features, -1, 0)
    weights = np.asarray(spec.weights, dtype=np.float64)[:, class_index]
    grid = np.tensordot(weights, maps.astype(np.float64), axes=(0, 0))
    return ClassActivationMap(class_index, grid, float(spec.bias[class_index]))


def cell_stride(cells: int, input_px: int) -> int:
    """The input pixels between neighbouring cells of a map with `cells` cells along an axis of
    `input_px` pixels.

    A map that tiles the input exactly (224 / 7 = 32) has that stride. A map that does not was made
    by a floor pooling that dropped the last row and column of the stage before it (`cxr_net`'s
    7 -> 3): its cells keep the power-of-two stride of the convolutions (64 for 3 cells on 224 px)
    and cover only the top-left 3 * 64 = 192 px, not the whole image.
    """
    if cells <= 0 or input_px <= 0:
        raise ValueError("a map and its input need at least one cell and one pixel")
    if input_px % cells == 0:
        return input_px // cells
    return 1 << int(np.floor(np.log2(input_px / cells)))


def _axis_weights(cells: int, out_px: int, input_px: int) -> np.ndarray:
    """(out_px, cells) linear-interpolation weights that put cell k's value at its receptive
    field's centre, stride * (k + 1/2) input pixels, and hold the edge cells' values beyond the
    outermost centres."""
    stride = cell_stride(cells, input_px)
    centres_out = (np.arange(out_px) + 0.5) * (input_px / out_px)  # in input pixels
    position = np.clip(centres_out / stride - 0.5, 0.0, cells - 1.0)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, cells - 1)
    frac = position - lower
    weights = np.zeros((out_px, cells))
    weights[np.arange(out_px), lower] += 1.0 - frac
    weights[np.arange(out_px), upper] += frac
    return weights


def upsample(
    values: np.ndarray,
    width: int,
    height: int,
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """A map resized to `width` x `height` pixels of a picture of the model input, bilinear between
    the cells' true centres (`cell_stride`). `input_size` is the model input's (width, height);
    by default the picture is the model input itself."""
    input_w, input_h = input_size or (width, height)
    rows, columns = values.shape
    along_y = _axis_weights(rows, height, input_h)
    along_x = _axis_weights(columns, width, input_w)
    resized = along_y @ values.astype(np.float64) @ along_x.T
    clipped: np.ndarray = np.clip(resized, float(values.min()), float(values.max()))
    return clipped


def colour(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB by the colour scale above."""
    positions = _COLOUR_STOPS[:, 0]
    channels = [np.interp(values, positions, _COLOUR_STOPS[:, i]) for i in (1, 2, 3)]
    rgb: np.ndarray = np.rint(np.stack(channels, axis=-1)).astype(np.uint8)
    return rgb


def blend(grey: np.ndarray, heat_rgb: np.ndarray, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """The heat map laid over the grey image with the given opacity, uint8 RGB."""
    base = np.repeat(grey[..., None].astype(np.float64), 3, axis=-1)
    mixed = (1.0 - opacity) * base + opacity * heat_rgb.astype(np.float64)
    return np.rint(mixed).astype(np.uint8)


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ExplanationImages:
    """The pictures of one map at the model input's size, as base64 PNG."""

    image_png: str  # the model input, as the 8-bit grey image it was made from
    heatmap_png: str  # the coloured map alone
    overlay_png: str  # the map over the image at DEFAULT_OPACITY


def render_images(
    tensor: np.ndarray, cam: ClassActivationMap, scale: float, offset: float
) -> ExplanationImages:
    """Pictures for one model input (1, H, W, C) and its map."""
    pixels = tensor[0].mean(axis=-1)  # grey, or the mean of RGB
    grey = np.clip(np.rint((pixels - offset) / scale), 0, 255).astype(np.uint8)
    height, width = grey.shape
    heat = colour(upsample(cam.normalised, width, height))
    return ExplanationImages(
        image_png=png_base64(grey),
        heatmap_png=png_base64(heat),
        overlay_png=png_base64(blend(grey, heat)),
    )
