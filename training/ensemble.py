"""Several trained runs as one network: one graph that averages their logits, calibrated anew.

    python -m training.ensemble --runs runs/a runs/b --out runs/ensemble-ab

The members must share one split manifest (so validation and hold-out are held out from every one
of them). Writes a run directory that `training.export` takes as it is: `best.keras` (one input,
the members side by side, their logits averaged), the split manifest, and `summary.json` with the
temperature and threshold fitted again on validation, from the averaged logits, and hold-out
figures at that operating point.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from training import train
from training.data import read_split
from training.metrics import evaluate_scores, format_summary


def average_logits(models: list[Any]) -> Any:
    """One Keras model: the members applied to the same input, their logits averaged."""
    import keras

    inputs = keras.Input(models[0].input_shape[1:], name="image")
    outputs = []
    for i, member in enumerate(models):
        member.name = f"member{i}"  # nested models need distinct names
        outputs.append(member(inputs))
    averaged = keras.layers.Average(name="logits")(outputs)
    return keras.Model(inputs, averaged, name=f"ensemble_of_{len(models)}")


def combined_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The members' records side by side; sums where a sum means something (time, epochs)."""
    first = summaries[0]
    return {
        "architecture": f"ensemble of {len(summaries)} x {first['architecture']}",
        "preprocessing": first["preprocessing"],
        "augmentation": [s["augmentation"] for s in summaries],
        "class_weights": first["class_weights"],
        "epochs_run": sum(s["epochs_run"] for s in summaries),
        "best_epoch": "+".join(str(s["best_epoch"]) for s in summaries),
        "training_seconds": round(sum(s["training_seconds"] for s in summaries), 1),
        "hardware": first["hardware"],
        "seed": [s["seed"] for s in summaries],
        "hyperparameters": [s["hyperparameters"] for s in summaries],
        "data": first["data"],
    }


def build(runs: list[Path], out: Path, cache_dir: Path | None, target_sensitivity: float) -> dict:
    import keras

    import training.models  # noqa: F401  (registers the custom layers for loading)

    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    split_hashes = {s["data"]["split_sha256"] for s in summaries}
    if len(split_hashes) != 1:
        raise ValueError("the runs were trained on different splits; validation would leak")
    model = average_logits(
        [keras.models.load_model(run / "best.keras", compile=False) for run in runs]
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "best.keras")
    shutil.copyfile(runs[0] / "split.csv", out / "split.csv")

    seed = summaries[0]["seed"]  # for the bootstrap intervals, as in a single run
    splits = read_split(out / "split.csv")
    val = train.Slice.load(splits["val"], cache_dir)
    point = train.choose_operating_point(model, val, target_sensitivity)
    summary = combined_summary(summaries)
    summary["parameters"] = int(model.count_params())
    summary["members"] = [str(run) for run in runs]
    summary["decision"] = {
        "threshold": round(point.threshold, 6),
        "target_sensitivity": target_sensitivity,
        "chosen_on": "validation",
    }
    summary["calibration"] = point.calibration
    summary["validation_metrics"] = evaluate_scores(
        val.labels, point.val_calibrated, point.threshold, val.groups, seed=seed
    )
    if "holdout" in splits:
        holdout = train.Slice.load(splits["holdout"], cache_dir)
        summary["holdout_metrics"] = train.score_holdout(model, holdout, point, seed=seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories")
    p.add_argument("--out", type=Path, required=True, help="run directory for the ensemble")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    p.add_argument("--target-sensitivity", type=float, default=train.DEFAULT_TARGET_SENSITIVITY)
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("an ensemble needs at least two runs")
    summary = build(args.runs, args.out, args.cache_dir, args.target_sensitivity)
    print(
        f"[ensemble] {summary['architecture']}: validation\n"
        + format_summary(summary["validation_metrics"])
    )
    if "holdout_metrics" in summary:
        print("[ensemble] hold-out\n" + format_summary(summary["holdout_metrics"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
