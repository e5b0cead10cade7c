"""Images in memory and the tf.data pipeline (augmentation is here, not in the graph)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import Preprocessing
from training.data import Record
from training.preprocessing import DEFAULT_PREPROCESSING, PIXEL_MAX, load_image, scale


@dataclass(frozen=True)
class Augmentation:
    """Random geometry and exposure changes applied to training batches only.

    Horizontal flip is off by default: a chest film has a fixed left-right anatomy (heart, aortic
    knob, gastric bubble) and often a lateral marker, so a flipped image is not a plausible X-ray
    of the same child but one of dextrocardia. Rotations, shifts and zoom stay small because
    positioning of PA/AP films varies only a little.
    """

    rotation_deg: float = 10.0
    shear: float = 0.1
    shift: float = 0.1
    zoom: float = 0.1
    horizontal_flip: bool = False
    brightness: float = 0.1
    contrast: float = 0.2
    # "nearest" repeats the edge rows: black ("constant") borders on most training images but none
    # at inference shift the BatchNorm statistics the model is evaluated with.
    fill_mode: str = "nearest"
    # Acquisition changes the in-graph per-image standardisation does not undo (it removes linear
    # brightness and contrast only): a detector's or a post-processing curve's non-linear response
    # (gamma), focal-spot and scatter blur, quantum noise, and tighter collimation (a zoom-in crop).
    # All off by default, which is the 1.0 recipe.
    gamma: float = 0.0  # gamma drawn log-uniformly from [exp(-gamma), exp(gamma)] per image
    blur_sigma: float = 0.0  # Gaussian blur, sigma up to this many pixels, on half the images
    noise: float = 0.0  # additive Gaussian noise, std up to this fraction of the full range
    crop: float = 0.0  # zoom in by up to this fraction (height and width drawn apart)
    # What happens to an X-ray after acquisition, on its way to the model: a PACS or a viewer export
    # rescales it (with its own filter) and re-encodes it. On half the images each, drawn apart:
    # downscale by a factor in [resize_min, 1) per axis with bilinear, area or bicubic filtering,
    # then back to the model's size with the contract's bilinear filter; JPEG re-encoding at a
    # quality drawn from [jpeg_quality, 95]. Both off (0) by default.
    resize_min: float = 0.0
    jpeg_quality: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def load_images(
    records: Sequence[Record],
    spec: Preprocessing = DEFAULT_PREPROCESSING,
    cache_dir: Path | None = None,
    progress_every: int = 500,
) -> np.ndarray:
    """Decode `records` to one uint8 array (N, H, W, C), cached on disk by content of the list."""
    key = hashlib.sha256(
        # the cached images are step 3's: equalisation (step 5) happens on the way to the model
        (
            "\n".join(f"{r.path}|{r.sha256}" for r in records)
            + spec.model_dump_json(exclude={"equalization"})
        ).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / f"images-{key}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    out = np.empty((len(records), spec.height, spec.width, spec.channels), dtype=np.uint8)
    start = time.monotonic()
    for i, record in enumerate(records):
        out[i] = load_image(Path(record.path), spec)
        if progress_every and (i + 1) % progress_every == 0:
            print(
                f"[data] decoded {i + 1}/{len(records)} images ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return out


def augmenter(aug: Augmentation, seed: int) -> Any:
    """A Keras preprocessing stack, used inside tf.data on float pixel batches in [0, PIXEL_MAX]."""
    import keras
    from keras import layers

    stack = []
    if aug.horizontal_flip:
        stack.append(layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation_deg:
        stack.append(
            layers.RandomRotation(aug.rotation_deg / 360.0, fill_mode=aug.fill_mode, seed=seed + 1)
        )
    if aug.shear:
        stack.append(
            layers.RandomShear(
                x_factor=aug.shear, y_factor=aug.shear, fill_mode=aug.fill_mode, seed=seed + 2
            )
        )
    if aug.shift:
        stack.append(
            layers.RandomTranslation(aug.shift, aug.shift, fill_mode=aug.fill_mode, seed=seed + 3)
        )
    if aug.zoom:
        stack.append(layers.RandomZoom(aug.zoom, aug.zoom, fill_mode=aug.fill_mode, seed=seed + 4))
    if aug.crop:
        # negative factors zoom in only, so no fill is ever needed
        stack.append(layers.RandomZoom((-aug.crop, 0.0), (-aug.crop, 0.0), seed=seed + 7))
    pixel_range = (0.0, PIXEL_MAX)
    if aug.brightness:
        stack.append(
            layers.RandomBrightness(aug.brightness, value_range=pixel_range, seed=seed + 5)
        )
    if aug.contrast:
        stack.append(layers.RandomContrast(aug.contrast, value_range=pixel_range, seed=seed + 6))
    if aug.blur_sigma:
        stack.append(
            layers.RandomGaussianBlur(
                factor=0.5,  # the probability that an image is blurred at all
                kernel_size=5,
                sigma=(0.1, aug.blur_sigma),
                value_range=pixel_range,
                seed=seed + 8,
            )
        )
    return keras.Sequential(stack, name="augmentation") if stack else None


def exposure_jitter(x: Any, aug: Augmentation, seed: int) -> Any:
    """Per-image gamma and additive noise on a float pixel batch in [0, PIXEL_MAX] (TF ops)."""
    import tensorflow as tf

    per_image = tf.stack([tf.shape(x)[0], 1, 1, 1])
    if aug.gamma:
        gamma = tf.exp(tf.random.uniform(per_image, -aug.gamma, aug.gamma, seed=seed + 9))
        x = PIXEL_MAX * tf.pow(tf.clip_by_value(x / PIXEL_MAX, 0.0, 1.0), gamma)
    if aug.noise:
        sigma = tf.random.uniform(per_image, 0.0, aug.noise * PIXEL_MAX, seed=seed + 10)
        x = x + sigma * tf.random.normal(tf.shape(x), seed=seed + 11)
    return x


RESIZE_FILTERS = ("bilinear", "area", "bicubic")


def export_jitter(image: Any, aug: Augmentation, seed: int) -> Any:
    """One image (H, W, C) float in [0, PIXEL_MAX] -> rescaled and/or JPEG re-encoded (TF ops)."""
    import tensorflow as tf

    size = tf.shape(image)[:2]
    if aug.resize_min:
        scale_hw = tf.random.uniform([2], aug.resize_min, 1.0, seed=seed + 12)
        small = tf.maximum(tf.cast(tf.cast(size, tf.float32) * scale_hw, tf.int32), 8)
        choice = tf.random.uniform([], 0, len(RESIZE_FILTERS), dtype=tf.int32, seed=seed + 13)
        branches = [
            (lambda m=m: tf.image.resize(image, small, method=m, antialias=True))
            for m in RESIZE_FILTERS
        ]
        resized = tf.image.resize(tf.switch_case(choice, branches), size, method="bilinear")
        apply = tf.random.uniform([], seed=seed + 14) < 0.5
        image = tf.where(apply, tf.clip_by_value(resized, 0.0, PIXEL_MAX), image)
    if aug.jpeg_quality:
        quality = tf.random.uniform([], aug.jpeg_quality, 96, dtype=tf.int32, seed=seed + 15)
        pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, PIXEL_MAX)), tf.uint8)
        encoded = tf.cast(tf.image.adjust_jpeg_quality(pixels, quality), tf.float32)
        apply = tf.random.uniform([], seed=seed + 16) < 0.5
        image = tf.where(apply, tf.reshape(encoded, tf.shape(image)), image)
    return image


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    spec: Preprocessing,
    batch_size: int,
    num_classes: int = 2,
    augmentation: Augmentation | None = None,
    shuffle: bool = False,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
) -> Any:
    """uint8 images -> (optional) augmentation -> contract scaling -> one-hot labels, prefetched."""
    import tensorflow as tf

    tensors: tuple = (
        (images, labels) if sample_weights is None else (images, labels, sample_weights)
    )
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    aug_model = augmenter(augmentation, seed) if augmentation is not None else None

    def to_inputs(x: Any, y: Any, *w: Any) -> tuple[Any, ...]:
        x = tf.cast(x, tf.float32)
        if augmentation is not None:
            # augment in pixel units, then apply the contract's scaling like every other input
            x = aug_model(x, training=True) if aug_model is not None else x
            x = exposure_jitter(x, augmentation, seed)
            x = tf.clip_by_value(x, 0.0, PIXEL_MAX)
        x = scale(x, spec)
        y = tf.one_hot(tf.cast(y, tf.int32), num_classes)
        return (x, y, *w)

    def batch_augment(x: Any, *rest: Any) -> tuple[Any, ...]:
        assert augmentation is not None
        x = tf.cast(x, tf.float32)
        x = aug_model(x, training=True) if aug_model is not None else x
        x = exposure_jitter(x, augmentation, seed)
        return (tf.clip_by_value(x, 0.0, PIXEL_MAX), *rest)

    def finish(x: Any, y: Any, *w: Any) -> tuple[Any, ...]:
        y = tf.one_hot(tf.cast(y, tf.int32), num_classes)
        return (scale(x, spec), y, *w)

    if augmentation is not None and (augmentation.resize_min or augmentation.jpeg_quality):
        # the per-image export jitter runs between the batched augmentation and the scaling
        ds = ds.map(batch_augment, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        ds = ds.map(
            lambda x, *rest: (export_jitter(x, augmentation, seed), *rest),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.batch(batch_size).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
        batches = -(-len(images) // batch_size)  # unbatch() loses the count Keras' epochs need
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
        return ds.prefetch(tf.data.AUTOTUNE)
    return ds.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
