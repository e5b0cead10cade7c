"""Several trained runs as one network: one graph that averages their logits (with exact class
activation maps), calibrated anew.

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

from app.contract import Preprocessing
from training import train
from training.data import read_split
from training.metrics import evaluate_scores, format_summary


def average_logits(models: list[Any]) -> Any:
    """One Keras model whose logits are the mean of the members' logits, built so that its class
    activation maps stay exact.

    Each member ends in global average pooling then one dense layer (`gap`, `logits`). The mean of
    the members' logits, (1/K) sum_i (W_i^T GAP(f_i) + b_i), is one dense layer over the pooled
    concatenation of their feature maps, with the kernels stacked and divided by K and the mean
    bias: so the ensemble is features side by side -> GAP -> Dense, the head `training.cam`
    finds, and its map is the mean of the members' maps. Members need the same grid.
    Averaging the members' logits after their own heads would hide that head from the CAM.
    """
    import keras
    import numpy as np

    inputs = keras.Input(models[0].input_shape[1:], name="image")
    features, kernels, biases = [], [], []
    for i, member in enumerate(models):
        try:
            pooled_input = member.get_layer("gap").input
            kernel, bias = member.get_layer("logits").get_weights()
        except ValueError as exc:
            raise ValueError(
                f"member {i} ({member.name}) does not end in `gap` then `logits`"
            ) from exc
        extractor = keras.Model(member.inputs, pooled_input, name=f"member{i}")
        features.append(extractor(inputs))
        kernels.append(kernel)
        biases.append(bias)
    grids = {tuple(f.shape[1:3]) for f in features}
    if len(grids) != 1:
        raise ValueError(f"the members' feature maps differ in size: {sorted(grids)}")
    x = features[0] if len(features) == 1 else keras.layers.Concatenate(name="members")(features)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(len(biases[0]), name="logits")
    outputs = dense(x)
    dense.set_weights([np.concatenate(kernels, axis=0) / len(models), np.mean(biases, axis=0)])
    return keras.Model(inputs, outputs, name=f"ensemble_of_{len(models)}")


def combined_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The members' records side by side; sums where a sum means something (time, epochs)."""
    first = summaries[0]
    if any(s["preprocessing"] != first["preprocessing"] for s in summaries):
        raise ValueError("the members were trained under different preprocessing contracts")
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s["architecture"]] = counts.get(s["architecture"], 0) + 1
    members = " + ".join(f"{n} x {arch}" for arch, n in counts.items())
    return {
        # "ensemble of 2 x cxr_net_7", "ensemble of 2 x cxr_net_7 + 1 x resnet_small"
        "architecture": f"ensemble of {members}",
        "preprocessing": first["preprocessing"],
        "augmentation": [s["augmentation"] for s in summaries],
        "class_weights": first["class_weights"],
        "epochs_run": sum(s["epochs_run"] for s in summaries),
        "best_epoch": "+".join(str(s["best_epoch"]) for s in summaries),
        "training_seconds": round(sum(s["training_seconds"] for s in summaries), 1),
        "hardware": first["hardware"],
        # the members share the split (its seed, `data.split_sha256`) and differ in initialisation
        "seed": [s.get("init_seed", s["seed"]) for s in summaries],
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
    spec = Preprocessing.model_validate(summaries[0]["preprocessing"])
    val = train.Slice.load(splits["val"], cache_dir, spec)
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
        holdout = train.Slice.load(splits["holdout"], cache_dir, spec)
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
