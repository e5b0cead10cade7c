"""One command from the real data to the shipped model in `models/`.

    python -m training.release --data-dir ../shared/data/chest_xray

Runs, in order: `training.train` (patient-level split, training, temperature and threshold on
validation), `training.export` (ONNX + metadata, parity gate), then the single evaluation on the
test split (`training.evaluate --record`), the model card and the figures. `--skip-train` re-exports
an existing run.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from training import evaluate, export, model_card, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", type=Path, required=True, help="Kaggle-style root with train/ and test/"
    )
    p.add_argument("--run", type=Path, default=Path("runs/shipped"))
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--name", default="pneumonia_cxr")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--skip-train", action="store_true", help="reuse the run directory's checkpoint")
    args, train_args = p.parse_known_args(argv)

    if not args.skip_train:
        code = train.main(["--data-dir", str(args.data_dir), "--out", str(args.run), *train_args])
        if code:
            return code
    meta_path = export.export_run(
        args.run, args.models_dir, args.name, args.version, export.DEFAULT_TOLERANCE, 32
    )
    report = evaluate.evaluate(meta_path, args.data_dir, "test", args.run / "test")
    evaluate.record_in_metadata(meta_path, "test", report["metrics"])
    figures = args.models_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for src, dst in (
        (args.run / "training_curves.png", "training_curves.png"),
        (args.run / "class_distribution.png", "class_distribution.png"),
        (args.run / "val_roc.png", "validation_roc.png"),
        (args.run / "val_reliability.png", "validation_reliability.png"),
        (args.run / "test" / "roc.png", "test_roc.png"),
        (args.run / "test" / "confusion_matrix.png", "test_confusion_matrix.png"),
        (args.run / "test" / "sample_grid.png", "test_samples.png"),
    ):
        shutil.copyfile(src, figures / dst)
    model_card.main(["--model", str(meta_path)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
