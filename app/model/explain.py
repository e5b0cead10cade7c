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


def upsample(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """A [0, 1] map resized to the model input's size, bilinear (cell centres align)."""
    image = Image.fromarray(values.astype(np.float32), mode="F")
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    clipped: np.ndarray = np.clip(resized, 0.0, 1.0)
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
