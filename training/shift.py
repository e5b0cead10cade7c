"""The synthetic-shift validation set (T1 of `docs/SELECTION_PROTOCOL.md`): validation images
rendered through fixed, seeded acquisition and export changes.

Each condition maps one contract-preprocessed image (uint8, 224x224, one channel) to another of the
same shape, deterministically: the noise is seeded by the condition and the image's position, so a
rendering is the same on every run and for every model. The conditions come in families; the
`held_out` ones are not imitated by any training augmentation in `training.dataset`, so that the set
measures more than the training distribution again.

    python -m training.shift --run runs/c7 --out runs/c7/shift   # render, cache, print a summary
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

Render = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Condition:
    name: str
    family: str
    held_out: bool
    render: Render


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gamma(g: float) -> Render:
    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        return _u8(255.0 * (img / 255.0) ** g)

    return render


def _equalise(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
    hist = np.bincount(img.ravel(), minlength=256)
    cdf = np.cumsum(hist).astype(np.float64)
    cdf = (cdf - cdf.min()) / max(cdf[-1] - cdf.min(), 1.0)
    return _u8(255.0 * cdf[img])


def _sigmoid_voi(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
    # DICOM's SIGMOID VOI LUT function, centred on the median with the interquartile range as width
    x = img.astype(np.float64)
    centre = np.median(x)
    q1, q3 = np.percentile(x, [25, 75])
    width = max(q3 - q1, 1.0)
    return _u8(255.0 / (1.0 + np.exp(-4.0 * (x - centre) / width)))


def _window(lo_pct: float, hi_pct: float) -> Render:
    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        lo, hi = np.percentile(img, [lo_pct, hi_pct])
        return _u8(255.0 * np.clip((img - lo) / max(hi - lo, 1.0), 0.0, 1.0))

    return render


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(img))


def _resample(factor: float, down: Image.Resampling, up: Image.Resampling) -> Render:
    """Resize by `factor` with `down` (or `up` when enlarging), then back to 224 with the contract's
    bilinear filter."""

    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = img.shape
        size = (round(w * factor), round(h * factor))
        other = _pil(img).resize(size, down if factor < 1 else up)
        return np.asarray(other.resize((w, h), Image.Resampling.BILINEAR))

    return render


def _up_then_down(factor: int, down: Image.Resampling) -> Render:
    """A detector-sized image (bicubic upscale) reduced by another filter than the contract's."""

    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = img.shape
        big = _pil(img).resize((w * factor, h * factor), Image.Resampling.BICUBIC)
        return np.asarray(big.resize((w, h), down))

    return render


def _blur(sigma: float) -> Render:
    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        return np.asarray(_pil(img).filter(ImageFilter.GaussianBlur(sigma)))

    return render


def _jpeg(quality: int) -> Render:
    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        buf = io.BytesIO()
        _pil(img).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))

    return render


def _j2k_reduced(factor: int, reduce: int, lossless: bool) -> Render:
    """Upscale to a detector-like size, encode as JPEG 2000 (5/3 lossless or 9/7 at 20:1), decode
    only down to wavelet level `reduce` (1/2**reduce per side), then the contract's bilinear resize:
    the reduced-resolution decode the service applies to large frames."""

    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = img.shape
        big = _pil(img).resize((w * factor, h * factor), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if lossless:
            big.save(buf, format="JPEG2000", irreversible=False, num_resolutions=6)
        else:
            big.save(
                buf,
                format="JPEG2000",
                irreversible=True,
                quality_mode="rates",
                quality_layers=[20],
                num_resolutions=6,
            )
        decoded = Image.open(io.BytesIO(buf.getvalue()))
        decoded.reduce = reduce  # type: ignore[method-assign, assignment]  # the plugin's setter
        decoded.load()
        return np.asarray(decoded.convert("L").resize((w, h), Image.Resampling.BILINEAR))

    return render


def _noise(std: float) -> Render:
    def render(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _u8(img + rng.normal(0.0, std * 255.0, img.shape))

    return render


def _affine(rotate_deg: float = 0.0, zoom: float = 1.0, squash: float = 1.0) -> Render:
    """Rotation about the centre, a centred zoom-in, or a horizontal squash (edge pixels repeated,
    as training's fill)."""

    def render(img: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = img.shape
        pad = max(h, w) // 4
        padded = np.pad(img, pad, mode="edge")
        out = _pil(padded)
        if rotate_deg:
            out = out.rotate(rotate_deg, resample=Image.Resampling.BILINEAR)
        ph, pw = padded.shape
        cw, ch = w / (zoom * squash), h / zoom
        box = ((pw - cw) / 2, (ph - ch) / 2, (pw + cw) / 2, (ph + ch) / 2)
        return np.asarray(out.resize((w, h), Image.Resampling.BILINEAR, box=box))

    return render


R = Image.Resampling
CONDITIONS: tuple[Condition, ...] = (
    Condition("gamma_0.70", "tone", False, _gamma(0.70)),
    Condition("gamma_0.85", "tone", False, _gamma(0.85)),
    Condition("gamma_1.20", "tone", False, _gamma(1.20)),
    Condition("gamma_1.40", "tone", False, _gamma(1.40)),
    Condition("equalise", "voi", True, _equalise),
    Condition("sigmoid_voi", "voi", True, _sigmoid_voi),
    Condition("window_p1_p99", "voi", True, _window(1.0, 99.0)),
    Condition("down_0.50_bilinear", "resample", False, _resample(0.5, R.BILINEAR, R.BILINEAR)),
    Condition("down_0.75_nearest", "resample", True, _resample(0.75, R.NEAREST, R.NEAREST)),
    Condition("up4_lanczos_down", "resample", True, _up_then_down(4, R.LANCZOS)),
    Condition("up4_box_down", "resample", True, _up_then_down(4, R.BOX)),
    Condition("blur_0.5", "blur", False, _blur(0.5)),
    Condition("blur_1.0", "blur", False, _blur(1.0)),
    Condition("jpeg_q50", "jpeg", False, _jpeg(50)),
    Condition("jpeg_q30", "jpeg", False, _jpeg(30)),
    Condition("j2k_97_x4_level1", "j2k", True, _j2k_reduced(4, 1, lossless=False)),
    Condition("j2k_53_x8_level2", "j2k", True, _j2k_reduced(8, 2, lossless=True)),
    Condition("noise_0.01", "noise", False, _noise(0.01)),
    Condition("noise_0.03", "noise", False, _noise(0.03)),
    Condition("rotate_5", "geometry", False, _affine(rotate_deg=5.0)),
    Condition("zoom_in_5pct", "geometry", False, _affine(zoom=1.05)),
    Condition("squash_10pct", "geometry", True, _affine(squash=0.9)),
)
SEED = 20261207


def condition_seed(name: str, index: int) -> int:
    digest = hashlib.sha256(f"{SEED}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def render(condition: Condition, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 1) -> the same images through `condition`."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        rng = np.random.default_rng(condition_seed(condition.name, i))
        out[i, :, :, 0] = condition.render(img[:, :, 0], rng)
    return out


def render_all(
    images: np.ndarray, cache_dir: Path | None = None, progress: bool = True
) -> dict[str, np.ndarray]:
    """Every condition over `images`, cached on disk by the images' bytes and the condition."""
    key = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    rendered = {}
    for condition in CONDITIONS:
        cache = Path(cache_dir) / f"shift-{key}-{condition.name}.npy" if cache_dir else None
        if cache is not None and cache.is_file():
            rendered[condition.name] = np.load(cache)
            continue
        rendered[condition.name] = render(condition, images)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, rendered[condition.name])
        if progress:
            print(f"[shift] rendered {condition.name} ({len(images)} images)", flush=True)
    return rendered
