"""Train a model on the patient-level split, then calibrate and choose its threshold on validation.

    python -m training.train --data-dir ../shared/data/chest_xray --out runs/cxr_net

Writes to `--out`: the split manifest, the best checkpoint (by validation AUC unless `--monitor
loss`), the epoch history (CSV + JSON), validation logits, the fitted temperature and operating
threshold, and plots. With `--holdout-fraction`, a second slice of train is held out by patient and
scored with the validation-fitted temperature and threshold: an out-of-sample check of both. The
test split is never read here.

`main` builds the run's options once from the command line (`options_from_args`: `DataOptions`,
`FitOptions`, the `Augmentation`), then runs the steps in order, each given only the options it
reads: `prepare_data`, `build_and_fit`, `choose_operating_point`, `score_holdout`,
`write_summary`, `write_plots`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.contract import Preprocessing
from training.data import (
    CLASSES,
    Record,
    class_counts,
    load_kaggle_directory,
    load_rsna,
    records_fingerprint,
    split_by_patient,
    write_split,
)
from training.dataset import Augmentation, load_images, make_dataset
from training.metrics import (
    evaluate_scores,
    expected_calibration_error,
    fit_temperature,
    format_summary,
    negative_log_likelihood,
    positive_probabilities,
    roc_auc,
    select_threshold,
)
from training.models import ARCHITECTURES, DEFAULT_ARCHITECTURE, WIDTH_ARCHITECTURES
from training.preprocessing import DEFAULT_PREPROCESSING, scale

DEFAULT_TARGET_SENSITIVITY = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group(
        "data (a Kaggle-style directory, or RSNA labels CSV + DICOM directory)"
    )
    src.add_argument(
        "--data-dir", type=Path, help="directory with train/<CLASS>/* (and manifest.csv)"
    )
    src.add_argument("--rsna-labels", type=Path, help="stage_2_train_labels.csv")
    src.add_argument("--rsna-images", type=Path, help="directory of <patientId>.dcm")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--arch", default=DEFAULT_ARCHITECTURE, choices=sorted(ARCHITECTURES))
    p.add_argument("--weights", type=Path, help="local ImageNet weights file for mobilenet_v2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--fine-tune-epochs", type=int, default=5, help="mobilenet_v2: epochs with the top unfrozen"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--schedule",
        choices=("plateau", "cosine"),
        default="plateau",
        help="learning rate: cut by 0.3 when the monitored quantity stalls, or cosine decay to "
        "1%% of --lr over --epochs",
    )
    p.add_argument(
        "--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing"
    )
    p.add_argument(
        "--width",
        type=int,
        default=32,
        help="cxr_net, cxr_net_7, resnet_small: filters of the first stage",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop before an epoch that would end past this wall-clock budget (0: no limit)",
    )
    p.add_argument("--patience", type=int, default=6, help="early stopping patience (epochs)")
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights with this momentum (e.g. 0.99) "
        "and validate, checkpoint and ship the averaged weights, with BatchNorm statistics "
        "recomputed for them (0: off)",
    )
    p.add_argument(
        "--monitor",
        choices=("auc", "loss"),
        default="auc",
        help="validation quantity for early stopping, LR reduction and the best checkpoint; AUC by "
        "default because temperature and threshold are fitted afterwards, so ranking is what the "
        "network itself must get right",
    )
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="also hold out this fraction of the remaining training images, by patient, as a "
        "second check that nothing is fitted on (0: none)",
    )
    p.add_argument("--seed", type=int, default=1337, help="the split's seed (and by default all)")
    p.add_argument(
        "--init-seed",
        type=int,
        help="seed of initialisation, shuffling and augmentation alone (default: --seed), for "
        "ensemble members trained on one split",
    )
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY)
    p.add_argument("--no-class-weights", action="store_true", help="do not reweight the classes")
    p.add_argument(
        "--limit", type=int, default=0, help="use only the first N training records (smoke runs)"
    )
    a = Augmentation()
    p.add_argument("--rotation", type=float, default=a.rotation_deg, help="max rotation, degrees")
    p.add_argument("--shear", type=float, default=a.shear)
    p.add_argument("--shift", type=float, default=a.shift, help="max width/height shift, fraction")
    p.add_argument("--zoom", type=float, default=a.zoom)
    p.add_argument("--brightness", type=float, default=a.brightness)
    p.add_argument("--contrast", type=float, default=a.contrast)
    p.add_argument("--gamma", type=float, default=a.gamma, help="max |log gamma| per image")
    p.add_argument("--blur-sigma", type=float, default=a.blur_sigma, help="max blur sigma, px")
    p.add_argument("--noise", type=float, default=a.noise, help="max noise std, fraction of range")
    p.add_argument("--crop", type=float, default=a.crop, help="max zoom-in crop, fraction")
    p.add_argument(
        "--resize-min",
        type=float,
        default=a.resize_min,
        help="export jitter: downscale half the images by a factor in [this, 1) and back (0: off)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=a.jpeg_quality,
        help="export jitter: re-encode half the images as JPEG at a quality in [this, 95] (0: off)",
    )
    p.add_argument(
        "--horizontal-flip", action="store_true", help="off by default, see Augmentation"
    )
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--equalize",
        choices=["none", "histogram"],
        default="none",
        help="contract step 5: per-image histogram equalisation of the model input (app.contract)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    args = p.parse_args(argv)
    if bool(args.data_dir) == bool(args.rsna_labels):
        p.error("give either --data-dir or --rsna-labels/--rsna-images")
    if args.rsna_labels and not args.rsna_images:
        p.error("--rsna-labels needs --rsna-images")
    return args


@dataclass(frozen=True)
class DataOptions:
    """Where the training images come from, how they are split and how they are prepared."""

    data_dir: Path | None  # a Kaggle-style directory, or
    rsna_labels: Path | None  # RSNA labels CSV
    rsna_images: Path | None  # and its DICOM directory
    val_fraction: float
    holdout_fraction: float  # 0: no hold-out slice
    split_seed: int  # also the bootstrap intervals' and the sample grid's seed
    limit: int  # 0: every training record
    cache_dir: Path | None
    equalization: Literal["none", "histogram"]

    @property
    def source(self) -> str:
        return str(self.data_dir or self.rsna_labels)

    @property
    def preprocessing(self) -> Preprocessing:
        return DEFAULT_PREPROCESSING.model_copy(update={"equalization": self.equalization})


@dataclass(frozen=True)
class FitOptions:
    """The network and how it is trained."""

    arch: str
    weights_file: Path | None  # local ImageNet weights (mobilenet_v2)
    width: int  # filters of the first stage, for WIDTH_ARCHITECTURES
    epochs: int
    fine_tune_epochs: int  # mobilenet_v2: epochs with the top of the base unfrozen
    batch_size: int
    lr: float
    schedule: Literal["plateau", "cosine"]
    label_smoothing: float
    max_minutes: float  # 0: no wall-clock budget
    patience: int
    ema: float  # momentum of the weight average; 0: off
    monitor: Literal["auc", "loss"]
    init_seed: int  # initialisation, shuffling and augmentation

    @property
    def monitored(self) -> tuple[str, str]:
        """The epoch-log key the callbacks watch, and whether higher or lower is better."""
        return ("val_auc", "max") if self.monitor == "auc" else ("val_loss", "min")

    @property
    def uses_width(self) -> bool:
        return self.arch in WIDTH_ARCHITECTURES


@dataclass(frozen=True)
class TrainingOptions:
    """One run's options, built once from the command line by `options_from_args`."""

    out: Path  # the run directory
    data: DataOptions
    fit: FitOptions
    augmentation: Augmentation | None  # None: --no-augment
    balance_classes: bool
    target_sensitivity: float
    init_seed_given: bool  # --init-seed was given: the summary records it


def options_from_args(args: argparse.Namespace) -> TrainingOptions:
    """The parsed command line as the options each step takes; the only reader of `args`."""
    data = DataOptions(
        data_dir=args.data_dir,
        rsna_labels=args.rsna_labels,
        rsna_images=args.rsna_images,
        val_fraction=args.val_fraction,
        holdout_fraction=args.holdout_fraction,
        split_seed=args.seed,
        limit=args.limit,
        cache_dir=args.cache_dir,
        equalization=args.equalize,
    )
    fit = FitOptions(
        arch=args.arch,
        weights_file=args.weights,
        width=args.width,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        max_minutes=args.max_minutes,
        patience=args.patience,
        ema=args.ema,
        monitor=args.monitor,
        init_seed=int(args.seed if args.init_seed is None else args.init_seed),
    )
    augmentation = None
    if not args.no_augment:
        augmentation = Augmentation(
            rotation_deg=args.rotation,
            shear=args.shear,
            shift=args.shift,
            zoom=args.zoom,
            horizontal_flip=args.horizontal_flip,
            brightness=args.brightness,
            contrast=args.contrast,
            gamma=args.gamma,
            blur_sigma=args.blur_sigma,
            noise=args.noise,
            crop=args.crop,
            resize_min=args.resize_min,
            jpeg_quality=args.jpeg_quality,
        )
    return TrainingOptions(
        out=args.out,
        data=data,
        fit=fit,
        augmentation=augmentation,
        balance_classes=not args.no_class_weights,
        target_sensitivity=args.target_sensitivity,
        init_seed_given=args.init_seed is not None,
    )


def load_training_records(options: DataOptions) -> list[Record]:
    if options.data_dir:
        records = load_kaggle_directory(options.data_dir, "train")
    else:
        if options.rsna_labels is None or options.rsna_images is None:
            raise ValueError("training data needs a data directory or RSNA labels and images")
        records = load_rsna(options.rsna_labels, options.rsna_images)
    if options.limit:
        rng = np.random.default_rng(options.split_seed)
        records = [
            records[i]
            for i in sorted(
                rng.choice(len(records), min(options.limit, len(records)), replace=False)
            )
        ]
    return records


@dataclass
class Slice:
    """One side of the split: its records, decoded uint8 images and labels."""

    records: list[Record]
    images: np.ndarray
    labels: np.ndarray
    spec: Preprocessing = DEFAULT_PREPROCESSING  # the contract the images go to the model by

    @classmethod
    def load(
        cls, records: list[Record], cache_dir: Path | None, spec: Preprocessing | None = None
    ) -> Slice:
        spec = spec or DEFAULT_PREPROCESSING
        images = load_images(records, spec, cache_dir)
        return cls(records, images, np.array([r.label for r in records], dtype=int), spec)

    def logits(self, model: Any, batch_size: int = 64) -> np.ndarray:
        return keras_logits(model, self.images, self.spec, batch_size)

    @property
    def groups(self) -> list[str]:
        return [r.patient_id for r in self.records]


@dataclass
class PreparedData:
    all_records: list[Record]
    train: Slice
    val: Slice
    holdout: Slice | None
    split_sha256: str


def prepare_data(options: DataOptions, out: Path) -> PreparedData:
    """Records -> patient-level split (written to `out/split.csv`) -> decoded images.

    The validation split depends only on the records, the validation fraction and the split seed,
    so adding a hold-out slice leaves validation exactly as it was; the hold-out slice is carved
    from what remains, with its own seed.
    """
    records = load_training_records(options)
    seed = options.split_seed
    train_recs, val_recs = split_by_patient(records, options.val_fraction, seed)
    splits = {"train": train_recs, "val": val_recs}
    if options.holdout_fraction:
        train_recs, holdout_recs = split_by_patient(train_recs, options.holdout_fraction, seed + 1)
        splits = {"train": train_recs, "val": val_recs, "holdout": holdout_recs}
    split_sha = write_split(out / "split.csv", splits)
    print(
        f"[data] {len(records)} images -> "
        + ", ".join(f"{name} {len(rs)} {class_counts(rs)}" for name, rs in splits.items())
        + f" (by patient, seed {seed})",
        flush=True,
    )
    holdout = splits.get("holdout")
    spec = options.preprocessing
    cache_dir = options.cache_dir
    return PreparedData(
        all_records=records,
        train=Slice.load(train_recs, cache_dir, spec),
        val=Slice.load(val_recs, cache_dir, spec),
        holdout=Slice.load(holdout, cache_dir, spec) if holdout else None,
        split_sha256=split_sha,
    )


def class_weights(labels: np.ndarray, balanced: bool) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over the training images), or all ones."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    return len(labels) / (len(CLASSES) * counts) if balanced else np.ones(len(CLASSES))


def keras_logits(
    model: Any, images: np.ndarray, spec: Preprocessing, batch_size: int = 64
) -> np.ndarray:
    """Keras logits for uint8 images, through the contract's scaling (and equalisation)."""
    return np.asarray(model.predict(scale(images, spec), batch_size=batch_size, verbose=0))


def validation_callback(val: Slice, batch_size: int) -> Any:
    """Unweighted validation loss and AUC from one prediction pass per epoch, added to the epoch
    logs before EarlyStopping / ReduceLROnPlateau / ModelCheckpoint read them."""
    import keras

    class ValidationMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logits = val.logits(self.model, batch_size * 2)
            probs = positive_probabilities(logits)
            logs = logs if logs is not None else {}
            logs["val_loss"] = negative_log_likelihood(logits, val.labels, 1.0)
            logs["val_auc"] = roc_auc(val.labels, probs)
            logs["val_accuracy"] = float(((probs >= 0.5) == val.labels).mean())
            print(
                f"\n[val] epoch {epoch + 1}: loss {logs['val_loss']:.4f} "
                f"auc {logs['val_auc']:.4f} acc@0.5 {logs['val_accuracy']:.4f}",
                flush=True,
            )

    return ValidationMetrics()


def time_limit_callback(minutes: float) -> Any:
    """Stop training before an epoch that would, at the pace so far, end past `minutes`."""
    import keras

    class TimeLimit(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.start = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            elapsed = time.monotonic() - self.start
            if elapsed / (epoch + 1) * (epoch + 2) > minutes * 60:
                print(f"[train] time budget of {minutes:g} min: stopping", flush=True)
                self.model.stop_training = True

    return TimeLimit()


@dataclass
class FitResult:
    model: Any
    history: list[dict[str, str]]
    epochs_run: int
    best_epoch: int
    seconds: float


def build_and_fit(
    options: FitOptions,
    data: PreparedData,
    weights: np.ndarray,
    augmentation: Augmentation | None,
    out: Path,
) -> FitResult:
    """Build `options.arch`, train it with validation-driven callbacks, return the best epoch's
    model."""
    import keras

    from training.models import build_model, unfreeze_top

    spec = data.train.spec
    train_ds = make_dataset(
        data.train.images,
        data.train.labels,
        spec,
        options.batch_size,
        augmentation=augmentation,
        shuffle=True,
        seed=options.init_seed,
        sample_weights=weights[data.train.labels].astype(np.float32),
    )
    model_options = {"width": options.width} if options.uses_width else {}
    model = build_model(
        options.arch,
        (spec.height, spec.width, spec.channels),
        weights=options.weights_file,
        **model_options,
    )
    print(f"[train] {options.arch}: {model.count_params():,} parameters", flush=True)
    checkpoint = out / "best.keras"
    monitor, mode = options.monitored
    steps_per_epoch = int(np.ceil(len(data.train.labels) / options.batch_size))

    def callbacks() -> list[Any]:
        # With an EMA the averaged weights are swapped in at each epoch's end, before validation,
        # early stopping and the checkpoint see the model, and swapped out again for training.
        chosen = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if options.ema else []
        chosen += [
            validation_callback(data.val, options.batch_size),
            keras.callbacks.EarlyStopping(
                monitor=monitor, mode=mode, patience=options.patience, restore_best_weights=True
            ),
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor=monitor, mode=mode, save_best_only=True
            ),
            keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        ]
        if options.schedule == "plateau":
            chosen.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=monitor, mode=mode, factor=0.3, patience=2, min_lr=1e-5
                )
            )
        if options.max_minutes:
            chosen.append(time_limit_callback(options.max_minutes))
        return chosen

    def compile_and_fit(lr: float, epochs: int, initial_epoch: int = 0) -> Any:
        rate: Any = lr
        if options.schedule == "cosine":
            rate = keras.optimizers.schedules.CosineDecay(
                lr, decay_steps=steps_per_epoch * (epochs - initial_epoch), alpha=0.01
            )
        model.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate=rate,
                weight_decay=1e-4,
                use_ema=bool(options.ema),
                ema_momentum=options.ema or 0.99,
            ),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=options.label_smoothing
            ),
            weighted_metrics=["accuracy"],
        )
        return model.fit(
            train_ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks(),
            verbose=2,
            shuffle=False,
        )

    (out / "history.csv").unlink(missing_ok=True)
    start = time.monotonic()
    history = compile_and_fit(options.lr, options.epochs)
    epochs_run = len(history.history["loss"])
    if options.arch == "mobilenet_v2" and options.fine_tune_epochs > 0:
        print("[train] fine-tuning the top of the MobileNetV2 base at lr/10", flush=True)
        unfreeze_top(model)
        history = compile_and_fit(
            options.lr / 10, epochs_run + options.fine_tune_epochs, initial_epoch=epochs_run
        )
        epochs_run += len(history.history["loss"])
    if options.ema:
        # fit() ends by writing the last epoch's averages into the model, over what early stopping
        # restored: the best epoch's averaged weights are the checkpoint's
        model.load_weights(str(checkpoint))
        recompute_batch_norm(model, data.train, options.batch_size)
    seconds = time.monotonic() - start
    model.save(checkpoint)  # restore_best_weights: the in-memory model is the best one

    rows = list(csv.DictReader((out / "history.csv").open()))
    (out / "history.json").write_text(json.dumps(rows, indent=1))
    return FitResult(model, rows, epochs_run, _best_epoch(rows, monitor, mode), seconds)


def recompute_batch_norm(model: Any, train: Slice, batch_size: int, batches: int = 60) -> None:
    """BatchNorm moving statistics for the weights the model holds now (averaged ones, which the
    statistics gathered during training never saw): forward passes in training mode over clean
    training images. Nothing trainable changes; momentum 0.9 forgets the old statistics within
    the first few dozen batches."""
    import keras

    rng = np.random.default_rng(0)
    order = rng.permutation(len(train.images))
    count = max(1, min(batches, len(train.images) // batch_size))
    for i in range(count):
        batch = scale(train.images[order[i * batch_size : (i + 1) * batch_size]], train.spec)
        model(keras.ops.convert_to_tensor(batch), training=True)
    print(f"[train] BatchNorm statistics recomputed over {count} batches", flush=True)


def _best_epoch(history: list[dict[str, str]], monitor: str, mode: str) -> int:
    values = [float(r[monitor]) for r in history]
    return int(np.argmax(values) if mode == "max" else np.argmin(values)) + 1


@dataclass
class OperatingPoint:
    """Temperature and threshold, both fitted on validation, with the validation scores."""

    temperature: float
    threshold: float
    calibration: dict[str, object]
    val_logits: np.ndarray
    val_raw: np.ndarray
    val_calibrated: np.ndarray

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return positive_probabilities(logits, self.temperature)


def choose_operating_point(model: Any, val: Slice, target_sensitivity: float) -> OperatingPoint:
    """Calibration and operating point: validation only."""
    logits = val.logits(model)
    temperature = fit_temperature(logits, val.labels)
    raw = positive_probabilities(logits)
    calibrated = positive_probabilities(logits, temperature)
    threshold = select_threshold(val.labels, calibrated, target_sensitivity)
    calibration = {
        "method": "temperature",
        "temperature": round(temperature, 6),
        "fitted_on": "validation",
        "val_ece_before": round(expected_calibration_error(val.labels, raw), 4),
        "val_ece_after": round(expected_calibration_error(val.labels, calibrated), 4),
    }
    return OperatingPoint(temperature, threshold, calibration, logits, raw, calibrated)


def score_holdout(
    model: Any, holdout: Slice, point: OperatingPoint, seed: int
) -> dict[str, object]:
    """The hold-out slice at the validation-fitted temperature and threshold."""
    logits = holdout.logits(model)
    return evaluate_scores(
        holdout.labels, point.probabilities(logits), point.threshold, holdout.groups, seed=seed
    )


def write_summary(
    options: TrainingOptions,
    data: PreparedData,
    fit: FitResult,
    weights: np.ndarray,
    point: OperatingPoint,
    val_metrics: dict[str, object],
    holdout_metrics: dict[str, object] | None,
) -> dict[str, object]:
    """`summary.json` (the run's record: its options, data, training and operating point) and the
    validation logits, in the run directory."""
    out = options.out
    data_options, fit_options = options.data, options.fit
    np.savez(
        out / "val_predictions.npz",
        logits=point.val_logits,
        labels=data.val.labels,
        groups=np.array(data.val.groups),
    )
    hyperparameters: dict[str, object] = {
        "batch_size": fit_options.batch_size,
        "lr": fit_options.lr,
        "optimizer": "AdamW(weight_decay=1e-4)",
        "patience": fit_options.patience,
        "val_fraction": data_options.val_fraction,
        "max_epochs": fit_options.epochs,
    }
    # recorded only when they differ from the 1.0 recipe, so its record reads as it always did
    for key, value, default in (
        ("schedule", fit_options.schedule, "plateau"),
        ("label_smoothing", fit_options.label_smoothing, 0.0),
        ("width", fit_options.width if fit_options.uses_width else 32, 32),
        ("holdout_fraction", data_options.holdout_fraction, 0.0),
        ("max_minutes", fit_options.max_minutes, 0.0),
        ("ema_momentum", fit_options.ema, 0.0),
    ):
        if value != default:
            hyperparameters[key] = value
    splits = {"train": data.train, "validation": data.val}
    if data.holdout is not None:
        splits["holdout"] = data.holdout
    summary: dict[str, object] = {
        "architecture": fit_options.arch,
        "parameters": int(fit.model.count_params()),
        "preprocessing": data.train.spec.model_dump(),
        "augmentation": options.augmentation.as_dict() if options.augmentation else None,
        "class_weights": dict(zip(CLASSES, weights.round(4).tolist(), strict=True)),
        "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "monitor": fit_options.monitored[0],
        "training_seconds": round(fit.seconds, 1),
        "hardware": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
        "seed": data_options.split_seed,
        **({"init_seed": fit_options.init_seed} if options.init_seed_given else {}),
        "hyperparameters": hyperparameters,
        "data": {
            "source": data_options.source,
            "train_fingerprint": records_fingerprint(data.all_records),
            "split_sha256": data.split_sha256,
            **{name: class_counts(s.records) for name, s in splits.items()},
            "n_val_patients": len(set(data.val.groups)),
            **(
                {"n_holdout_patients": len(set(data.holdout.groups))}
                if data.holdout is not None
                else {}
            ),
        },
        "decision": {
            "threshold": round(point.threshold, 6),
            "target_sensitivity": options.target_sensitivity,
            "chosen_on": "validation",
        },
        "calibration": point.calibration,
        "validation_metrics": val_metrics,
    }
    if holdout_metrics is not None:
        summary["holdout_metrics"] = holdout_metrics
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_plots(
    out: Path, data: PreparedData, fit: FitResult, point: OperatingPoint, seed: int
) -> None:
    from training import plots

    plots.training_curves(fit.history, out / "training_curves.png")
    plots.class_distribution(
        {"train": class_counts(data.train.records), "validation": class_counts(data.val.records)},
        out / "class_distribution.png",
    )
    plots.sample_grid(data.train.images, data.train.labels, out / "sample_grid.png", seed=seed)
    plots.roc(
        data.val.labels,
        point.val_calibrated,
        point.threshold,
        out / "val_roc.png",
        title="Validation ROC",
    )
    plots.calibration_curve(
        data.val.labels, point.val_raw, point.val_calibrated, out / "val_reliability.png"
    )


def main(argv: list[str] | None = None) -> int:
    options = options_from_args(parse_args(argv))
    import keras

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(options.fit.init_seed)

    data = prepare_data(options.data, out)
    weights = class_weights(data.train.labels, balanced=options.balance_classes)
    print(
        f"[train] class weights {dict(zip(CLASSES, np.round(weights, 3).tolist(), strict=True))}",
        flush=True,
    )
    fit = build_and_fit(options.fit, data, weights, options.augmentation, out)

    point = choose_operating_point(fit.model, data.val, options.target_sensitivity)
    seed = options.data.split_seed  # the bootstrap intervals' and the sample grid's
    val_metrics = evaluate_scores(
        data.val.labels, point.val_calibrated, point.threshold, data.val.groups, seed=seed
    )
    holdout_metrics = (
        score_holdout(fit.model, data.holdout, point, seed) if data.holdout is not None else None
    )
    write_summary(options, data, fit, weights, point, val_metrics, holdout_metrics)
    write_plots(out, data, fit, point, seed)
    print(
        f"[done] {fit.epochs_run} epochs in {fit.seconds / 60:.1f} min; temperature "
        f"{point.temperature:.3f}, threshold {point.threshold:.4f} for sensitivity >= "
        f"{options.target_sensitivity} on validation\n"
        f"[val] ECE {point.calibration['val_ece_before']:.4f} -> "
        f"{point.calibration['val_ece_after']:.4f}\n" + format_summary(val_metrics),
        flush=True,
    )
    if holdout_metrics is not None:
        print(
            f"[holdout] ECE {holdout_metrics['ece']:.4f}\n" + format_summary(holdout_metrics),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
