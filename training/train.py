"""Train a model on the patient-level split, then calibrate and choose its threshold on validation.

    python -m training.train --data-dir ../shared/data/chest_xray --out runs/cxr_net

Writes to `--out`: the split manifest, the best checkpoint (by validation loss), the epoch history
(CSV + JSON), validation logits, the fitted temperature and operating threshold, and plots. The test
split is never read here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from training.data import (
    CLASSES,
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
    roc_auc,
    select_threshold,
    softmax,
)
from training.models import ARCHITECTURES, DEFAULT_ARCHITECTURE
from training.preprocessing import DEFAULT_PREPROCESSING

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
    p.add_argument("--patience", type=int, default=6, help="early stopping patience (epochs)")
    p.add_argument(
        "--monitor",
        choices=("auc", "loss"),
        default="auc",
        help="validation quantity for early stopping, LR reduction and the best checkpoint; AUC by "
        "default because temperature and threshold are fitted afterwards, so ranking is what the "
        "network itself must get right",
    )
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=1337)
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
    p.add_argument(
        "--horizontal-flip", action="store_true", help="off by default, see Augmentation"
    )
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    args = p.parse_args(argv)
    if bool(args.data_dir) == bool(args.rsna_labels):
        p.error("give either --data-dir or --rsna-labels/--rsna-images")
    if args.rsna_labels and not args.rsna_images:
        p.error("--rsna-labels needs --rsna-images")
    return args


def load_training_records(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.data_dir:
        records = load_kaggle_directory(args.data_dir, "train")
    else:
        records = load_rsna(args.rsna_labels, args.rsna_images)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        records = [
            records[i]
            for i in sorted(rng.choice(len(records), min(args.limit, len(records)), replace=False))
        ]
    return records


class ValidationMetrics:
    """Keras callback factory: unweighted validation loss and AUC computed from one prediction pass.

    Added to the epoch logs before EarlyStopping / ReduceLROnPlateau / ModelCheckpoint read them.
    """

    @staticmethod
    def create(images: np.ndarray, labels: np.ndarray, spec, batch_size: int):  # type: ignore[no-untyped-def]
        import keras

        class _Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
                x = images.astype(np.float32) * np.float32(spec.scale) + np.float32(spec.offset)
                logits = self.model.predict(x, batch_size=batch_size * 2, verbose=0)
                probs = softmax(logits)[:, 1]
                logs = logs if logs is not None else {}
                logs["val_loss"] = negative_log_likelihood(logits, labels, 1.0)
                logs["val_auc"] = roc_auc(labels, probs)
                logs["val_accuracy"] = float(((probs >= 0.5) == labels).mean())
                print(
                    f"\n[val] epoch {epoch + 1}: loss {logs['val_loss']:.4f} "
                    f"auc {logs['val_auc']:.4f} "
                    f"acc@0.5 {logs['val_accuracy']:.4f}",
                    flush=True,
                )

        return _Callback()


def _best_epoch(history: list[dict[str, str]], monitor: str, mode: str) -> int:
    values = [float(r[monitor]) for r in history]
    return int(np.argmax(values) if mode == "max" else np.argmin(values)) + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import keras

    from training import plots
    from training.models import build_model, unfreeze_top

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    spec = DEFAULT_PREPROCESSING

    records = load_training_records(args)
    train_recs, val_recs = split_by_patient(records, args.val_fraction, args.seed)
    split_sha = write_split(out / "split.csv", {"train": train_recs, "val": val_recs})
    print(
        f"[data] {len(records)} images -> train {len(train_recs)} {class_counts(train_recs)}, "
        f"validation {len(val_recs)} {class_counts(val_recs)} (by patient, seed {args.seed})",
        flush=True,
    )
    x_train = load_images(train_recs, spec, args.cache_dir)
    x_val = load_images(val_recs, spec, args.cache_dir)
    y_train = np.array([r.label for r in train_recs])
    y_val = np.array([r.label for r in val_recs])

    counts = np.bincount(y_train, minlength=len(CLASSES))
    weights = (
        np.ones(len(CLASSES)) if args.no_class_weights else len(y_train) / (len(CLASSES) * counts)
    )
    print(
        f"[train] class weights {dict(zip(CLASSES, np.round(weights, 3).tolist(), strict=True))}",
        flush=True,
    )
    augmentation = (
        None
        if args.no_augment
        else Augmentation(
            rotation_deg=args.rotation,
            shear=args.shear,
            shift=args.shift,
            zoom=args.zoom,
            horizontal_flip=args.horizontal_flip,
            brightness=args.brightness,
            contrast=args.contrast,
        )
    )
    train_ds = make_dataset(
        x_train,
        y_train,
        spec,
        args.batch_size,
        augmentation=augmentation,
        shuffle=True,
        seed=args.seed,
        sample_weights=weights[y_train].astype(np.float32),
    )

    model = build_model(args.arch, (spec.height, spec.width, spec.channels), weights=args.weights)
    print(f"[train] {args.arch}: {model.count_params():,} parameters", flush=True)
    checkpoint = out / "best.keras"
    monitor, mode = ("val_auc", "max") if args.monitor == "auc" else ("val_loss", "min")

    def callbacks():  # type: ignore[no-untyped-def]
        return [
            ValidationMetrics.create(x_val, y_val, spec, args.batch_size),
            keras.callbacks.EarlyStopping(
                monitor=monitor, mode=mode, patience=args.patience, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor, mode=mode, factor=0.3, patience=2, min_lr=1e-5
            ),
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor=monitor, mode=mode, save_best_only=True
            ),
            keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        ]

    def compile_and_fit(lr: float, epochs: int, initial_epoch: int = 0):  # type: ignore[no-untyped-def]
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=lr, weight_decay=1e-4),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
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
    history = compile_and_fit(args.lr, args.epochs)
    epochs_run = len(history.history["loss"])
    if args.arch == "mobilenet_v2" and args.fine_tune_epochs > 0:
        print("[train] fine-tuning the top of the MobileNetV2 base at lr/10", flush=True)
        unfreeze_top(model)
        history = compile_and_fit(
            args.lr / 10, epochs_run + args.fine_tune_epochs, initial_epoch=epochs_run
        )
        epochs_run += len(history.history["loss"])
    duration = time.monotonic() - start
    model.save(checkpoint)  # restore_best_weights: the in-memory model is the best one

    history_rows = list(csv.DictReader((out / "history.csv").open()))
    (out / "history.json").write_text(json.dumps(history_rows, indent=1))

    # Calibration and operating point: validation only.
    x_val_in = x_val.astype(np.float32) * np.float32(spec.scale) + np.float32(spec.offset)
    val_logits = model.predict(x_val_in, batch_size=64, verbose=0)
    temperature = fit_temperature(val_logits, y_val)
    raw = softmax(val_logits)[:, 1]
    calibrated = softmax(val_logits, temperature)[:, 1]
    threshold = select_threshold(y_val, calibrated, args.target_sensitivity)
    val_metrics = evaluate_scores(
        y_val, calibrated, threshold, [r.patient_id for r in val_recs], seed=args.seed
    )
    calibration = {
        "method": "temperature",
        "temperature": round(temperature, 6),
        "fitted_on": "validation",
        "val_ece_before": round(expected_calibration_error(y_val, raw), 4),
        "val_ece_after": round(expected_calibration_error(y_val, calibrated), 4),
    }
    np.savez(
        out / "val_predictions.npz",
        logits=val_logits,
        labels=y_val,
        groups=np.array([r.patient_id for r in val_recs]),
    )
    summary = {
        "architecture": args.arch,
        "parameters": int(model.count_params()),
        "preprocessing": spec.model_dump(),
        "augmentation": augmentation.as_dict() if augmentation else None,
        "class_weights": dict(zip(CLASSES, weights.round(4).tolist(), strict=True)),
        "epochs_run": epochs_run,
        "best_epoch": _best_epoch(history_rows, monitor, mode),
        "monitor": monitor,
        "training_seconds": round(duration, 1),
        "hardware": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
        "seed": args.seed,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "AdamW(weight_decay=1e-4)",
            "patience": args.patience,
            "val_fraction": args.val_fraction,
            "max_epochs": args.epochs,
        },
        "data": {
            "source": str(args.data_dir or args.rsna_labels),
            "train_fingerprint": records_fingerprint(records),
            "split_sha256": split_sha,
            "train": class_counts(train_recs),
            "validation": class_counts(val_recs),
            "n_val_patients": len({r.patient_id for r in val_recs}),
        },
        "decision": {
            "threshold": round(threshold, 6),
            "target_sensitivity": args.target_sensitivity,
            "chosen_on": "validation",
        },
        "calibration": calibration,
        "validation_metrics": val_metrics,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plots.training_curves(history_rows, out / "training_curves.png")
    plots.class_distribution(
        {"train": class_counts(train_recs), "validation": class_counts(val_recs)},
        out / "class_distribution.png",
    )
    plots.sample_grid(x_train, y_train, out / "sample_grid.png", seed=args.seed)
    plots.roc(y_val, calibrated, threshold, out / "val_roc.png", title="Validation ROC")
    plots.calibration_curve(y_val, raw, calibrated, out / "val_reliability.png")
    print(
        f"[done] {epochs_run} epochs in {duration / 60:.1f} min; temperature {temperature:.3f}, "
        f"threshold {threshold:.4f} for sensitivity >= {args.target_sensitivity} on validation\n"
        f"[val] ECE {calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}\n"
        + format_summary(val_metrics),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
