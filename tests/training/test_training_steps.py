"""The training steps that need no trained model: the options built from the command line, the split
with its hold-out slice, class weights, and the tf.data pipeline's scaling and augmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from training import train
from training.data import read_split
from training.dataset import Augmentation
from training.preprocessing import DEFAULT_PREPROCESSING, PIXEL_MAX, scale


def _options(*argv: str) -> train.TrainingOptions:
    return train.options_from_args(train.parse_args(list(argv)))


def _prepare(data_dir: Path, out: Path, *extra: str) -> train.PreparedData:
    options = _options(
        "--data-dir", str(data_dir), "--out", str(out), "--val-fraction", "0.25", *extra
    )
    out.mkdir(parents=True, exist_ok=True)
    return train.prepare_data(options.data, out)


def test_the_options_carry_the_command_lines_defaults() -> None:
    options = _options("--data-dir", "data", "--out", "run")
    assert options.out == Path("run")
    assert options.data == train.DataOptions(
        data_dir=Path("data"),
        rsna_labels=None,
        rsna_images=None,
        val_fraction=0.15,
        holdout_fraction=0.0,
        split_seed=1337,
        limit=0,
        cache_dir=Path("runs/.cache"),
        equalization="none",
    )
    assert options.data.source == "data"
    assert options.data.preprocessing == DEFAULT_PREPROCESSING
    fit = options.fit
    assert (fit.arch, fit.width, fit.epochs, fit.batch_size, fit.lr) == (
        "cxr_net",
        32,
        30,
        32,
        1e-3,
    )
    assert (fit.schedule, fit.monitor, fit.monitored) == ("plateau", "auc", ("val_auc", "max"))
    assert (fit.ema, fit.max_minutes, fit.patience, fit.label_smoothing) == (0.0, 0.0, 6, 0.0)
    assert fit.init_seed == 1337 and not options.init_seed_given
    assert options.augmentation == Augmentation()
    assert options.balance_classes
    assert options.target_sensitivity == train.DEFAULT_TARGET_SENSITIVITY


def test_the_initialisation_seed_follows_the_split_unless_given() -> None:
    base = ("--data-dir", "data", "--out", "run", "--seed", "7")
    assert _options(*base).fit.init_seed == 7
    given = _options(*base, "--init-seed", "7")
    assert given.fit.init_seed == 7 and given.init_seed_given  # recorded even when equal
    assert given.data.split_seed == 7
    other = _options(*base, "--init-seed", "11")
    assert (other.data.split_seed, other.fit.init_seed) == (7, 11)


def test_the_options_take_every_option_they_are_given() -> None:
    options = _options(
        "--rsna-labels", "labels.csv", "--rsna-images", "dicom", "--out", "run",
        "--equalize", "histogram", "--monitor", "loss", "--no-class-weights", "--no-augment",
        "--arch", "mobilenet_v2", "--width", "16", "--limit", "64",
    )  # fmt: skip
    assert options.data.source == "labels.csv"
    assert options.data.preprocessing.equalization == "histogram"
    assert options.data.limit == 64
    assert options.fit.monitored == ("val_loss", "min")
    assert not options.fit.uses_width  # the width applies to the small networks only
    assert options.augmentation is None
    assert not options.balance_classes
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.fit.lr = 0.1  # type: ignore[misc]


def test_the_hold_out_slice_leaves_validation_unchanged(
    tiny_kaggle_dir: Path, tmp_path: Path
) -> None:
    plain = _prepare(tiny_kaggle_dir, tmp_path / "plain")
    with_holdout = _prepare(tiny_kaggle_dir, tmp_path / "holdout", "--holdout-fraction", "0.3")
    assert plain.holdout is None
    assert with_holdout.holdout is not None
    assert with_holdout.val.records == plain.val.records
    sides = [with_holdout.train, with_holdout.val, with_holdout.holdout]
    patients = [set(s.groups) for s in sides]
    for i in range(3):
        for j in range(i + 1, 3):
            assert patients[i].isdisjoint(patients[j])
    assert set(with_holdout.train.records) | set(with_holdout.holdout.records) == set(
        plain.train.records
    )
    assert set(with_holdout.holdout.labels) == {0, 1}  # stratified: both classes held out
    written = read_split(tmp_path / "holdout" / "split.csv")
    assert written["holdout"] == with_holdout.holdout.records
    np.testing.assert_array_equal(
        with_holdout.holdout.labels, [r.label for r in with_holdout.holdout.records]
    )


def test_the_hold_out_slice_is_seeded(tiny_kaggle_dir: Path, tmp_path: Path) -> None:
    a = _prepare(tiny_kaggle_dir, tmp_path / "a", "--holdout-fraction", "0.3")
    b = _prepare(tiny_kaggle_dir, tmp_path / "b", "--holdout-fraction", "0.3")
    c = _prepare(tiny_kaggle_dir, tmp_path / "c", "--holdout-fraction", "0.3", "--seed", "5")
    assert a.holdout is not None and b.holdout is not None and c.holdout is not None
    assert a.holdout.records == b.holdout.records
    assert a.holdout.records != c.holdout.records


def test_class_weights_balance_the_classes() -> None:
    labels = np.array([0] * 25 + [1] * 75)
    weights = train.class_weights(labels, balanced=True)
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)
    assert weights[labels].mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(train.class_weights(labels, balanced=False), [1.0, 1.0])


def test_scaling_takes_arrays_and_tensors_alike() -> None:
    tf = pytest.importorskip("tensorflow")
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    from_array = scale(pixels, DEFAULT_PREPROCESSING)
    assert from_array.dtype == np.float32
    assert from_array.max() == np.float32(1.0)
    from_tensor = scale(tf.cast(pixels, tf.float32), DEFAULT_PREPROCESSING)
    np.testing.assert_array_equal(np.asarray(from_tensor), from_array)


@pytest.mark.slow
def test_without_augmentation_the_pipeline_feeds_exactly_the_contract_scaling() -> None:
    pytest.importorskip("tensorflow")
    from training.dataset import make_dataset

    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    (x, y), *_ = list(make_dataset(images, np.array([0, 1, 1, 0, 1]), DEFAULT_PREPROCESSING, 8))
    np.testing.assert_array_equal(np.asarray(x), scale(images, DEFAULT_PREPROCESSING))
    np.testing.assert_array_equal(np.asarray(y)[:, 1], [0, 1, 1, 0, 1])


@pytest.mark.slow
def test_gamma_bends_mid_greys_and_keeps_black_and_white() -> None:
    tf = pytest.importorskip("tensorflow")
    from training.dataset import exposure_jitter

    ramp = np.tile(np.linspace(0.0, PIXEL_MAX, 32, dtype=np.float32), (64, 32, 1))[..., None]
    out = np.asarray(exposure_jitter(tf.constant(ramp), Augmentation(gamma=0.5), seed=0))
    np.testing.assert_allclose(out[:, :, 0], 0.0, atol=1e-3)
    np.testing.assert_allclose(out[:, :, -1], PIXEL_MAX, rtol=1e-5)
    ratio = out[:, 0, 16, 0] / ramp[:, 0, 16, 0]  # one draw per image
    assert ratio.min() < 0.95 and ratio.max() > 1.05  # both darker and brighter mid-greys
    assert (np.diff(out[0, 0, :, 0]) > 0).all()  # monotonic: anatomy keeps its grey order
    unchanged = exposure_jitter(tf.constant(ramp), Augmentation(), seed=0)
    np.testing.assert_array_equal(np.asarray(unchanged), ramp)


@pytest.mark.slow
def test_augmented_batches_stay_in_the_contract_range() -> None:
    pytest.importorskip("tensorflow")
    from training.dataset import make_dataset

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 64, 64, 1), dtype=np.uint8)
    strong = Augmentation(gamma=0.5, blur_sigma=1.5, noise=0.1, crop=0.2)
    (x, _), *_ = list(
        make_dataset(images, np.zeros(16), DEFAULT_PREPROCESSING, 16, augmentation=strong, seed=2)
    )
    x = np.asarray(x)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert not np.allclose(x, scale(images, DEFAULT_PREPROCESSING), atol=0.02)


@pytest.mark.slow
def test_export_jitter_rescales_and_re_encodes_within_the_contract_range() -> None:
    """Resize jitter and JPEG re-encoding change some images, keep the shape and the range, and
    leave the batch count Keras needs for its epochs."""
    pytest.importorskip("tensorflow")
    from training.dataset import make_dataset

    rng = np.random.default_rng(4)
    base = np.linspace(0, 255, 64 * 64).reshape(64, 64)
    images = np.stack([np.roll(base, 7 * i, axis=1) for i in range(20)]).astype(np.uint8)
    images = (images[..., None] + rng.integers(0, 20, (*images.shape, 1))).astype(np.uint8)
    jitter = Augmentation(
        rotation_deg=0, shear=0, shift=0, zoom=0, brightness=0, contrast=0,
        resize_min=0.5, jpeg_quality=40,
    )  # fmt: skip
    ds = make_dataset(images, np.zeros(20), DEFAULT_PREPROCESSING, 8, augmentation=jitter, seed=5)
    assert int(ds.cardinality()) == 3
    x = np.concatenate([np.asarray(batch[0]) for batch in ds])
    assert x.shape == (20, 64, 64, 1)
    assert x.min() >= 0.0 and x.max() <= 1.0
    moved = np.abs(x - scale(images, DEFAULT_PREPROCESSING)).mean(axis=(1, 2, 3))
    assert (moved > 0.002).sum() >= 5  # about three in four images are jittered one way or both
    assert (moved < 0.5 / 255).sum() >= 1  # and some by neither
