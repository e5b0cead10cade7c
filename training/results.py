"""The record of every configuration tried: validation (and hold-out) figures, never test.

    python -m training.results --results models/pneumonia_cxr.results.json \
        add-model --model models/pneumonia_cxr.json --label "1.0.0 (shipped)" --description "..."
    python -m training.results --results models/pneumonia_cxr.results.json \
        add-run --run runs/acq-ls-cos --label acq-ls-cos --description "..."
    python -m training.results --results models/pneumonia_cxr.results.json decide --text "..."

Rows come from a run's `summary.json` or an exported model's metadata, so no figure is typed in by
hand. `training.model_card` renders the file, when it lies beside the metadata, as a table.
A row with the same label is replaced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.contract import load_metadata

# Fixed before any candidate was trained. Validation is near saturation (AUC 0.997), so the rule is
# deliberately simple and one-sided: a candidate replaces the shipped model only if it ranks
# validation better and gives up no specificity at the sensitivity target.
SELECTION_RULE = (
    "A candidate replaces the shipped model only if its validation ROC AUC is higher and its "
    "validation specificity at the validation-chosen threshold (sensitivity >= 0.95) is not lower; "
    "the hold-out slice confirms that the fitted temperature and threshold carry over. "
    "The test split plays no part."
)


def split_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures the table shows for one split, from `training.metrics.evaluate_scores`."""
    return {
        "roc_auc": metrics["roc_auc"]["value"],
        "roc_auc_ci95": metrics["roc_auc"]["ci95"],
        "accuracy": metrics["accuracy"]["value"],
        "sensitivity": metrics["recall"]["value"],
        "specificity": metrics["specificity"]["value"],
        "threshold": metrics["threshold"],
        "ece": metrics["ece"],
        "n": metrics["n"],
    }


def _row(
    label: str,
    description: str,
    model: dict[str, Any],
    training: dict[str, Any],
    validation: dict[str, Any],
    holdout: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "label": label,
        "description": description,
        "architecture": model["architecture"],
        "parameters": model["parameters"],
        "epochs_run": training["epochs_run"],
        "best_epoch": training["best_epoch"],
        "training_minutes": round(training["training_seconds"] / 60, 1),
        "hardware": training["hardware"],
        "validation": split_figures(validation),
        "holdout": split_figures(holdout) if holdout else None,
    }


def row_from_summary(summary: dict[str, Any], label: str, description: str) -> dict[str, Any]:
    """A row from a run's `summary.json` (training figures are top-level keys there)."""
    return _row(
        label,
        description,
        summary,
        summary,
        summary["validation_metrics"],
        summary.get("holdout_metrics"),
    )


def row_from_metadata(meta_path: Path, label: str, description: str) -> dict[str, Any]:
    """A row from an exported model's metadata (training figures under `provenance`)."""
    meta = load_metadata(meta_path)
    provenance: dict[str, Any] = dict(meta.provenance)
    metrics: dict[str, Any] = dict(meta.metrics)
    return _row(
        label,
        description,
        provenance,
        provenance["training"],
        metrics["validation"],
        metrics.get("holdout"),
    )


def load(path: Path) -> dict[str, Any]:
    if path.is_file():
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    return {"selection_rule": SELECTION_RULE, "rows": []}


def add_row(path: Path, row: dict[str, Any]) -> None:
    results = load(path)
    results["rows"] = [r for r in results["rows"] if r["label"] != row["label"]] + [row]
    path.write_text(json.dumps(results, indent=2) + "\n")


def _cell(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "n/a | n/a | n/a | n/a"
    lo, hi = figures["roc_auc_ci95"]
    return (
        f"{figures['roc_auc']:.4f} ({lo:.4f}-{hi:.4f}) | {figures['accuracy']:.3f} | "
        f"{figures['sensitivity']:.3f} / {figures['specificity']:.3f} | {figures['ece']:.3f}"
    )


def _conditions(row: dict[str, Any]) -> str:
    return f" ({row['conditions']})" if row.get("conditions") else ""


def markdown_table(results: dict[str, Any]) -> str:
    head = (
        "| configuration | validation ROC AUC (95% CI) | accuracy | sensitivity / specificity "
        "| ECE | hold-out ROC AUC (95% CI) | accuracy | sensitivity / specificity | ECE "
        "| epochs (best) | training |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in results["rows"]:
        lines.append(
            f"| **{row['label']}**: {row['description']} | {_cell(row['validation'])} | "
            f"{_cell(row['holdout'])} | {row['epochs_run']} ({row['best_epoch']}) | "
            f"{row['training_minutes']:.1f} min{_conditions(row)} |"
        )
    if results.get("decision"):
        lines.append(f"\nDecision: {results['decision']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", type=Path, required=True, help="results JSON to add to")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("add-run", help="a training run directory (its summary.json)")
    run.add_argument("--run", type=Path, required=True)
    model = sub.add_parser("add-model", help="an exported model (its metadata JSON)")
    model.add_argument("--model", type=Path, required=True)
    decide = sub.add_parser("decide", help="record the outcome of the selection rule")
    decide.add_argument("--text", required=True)
    for parser in (run, model):
        parser.add_argument("--label", required=True)
        parser.add_argument("--description", required=True)
        parser.add_argument(
            "--conditions", default="", help="how the training time was taken, if not alone"
        )
    args = p.parse_args(argv)
    if args.command == "decide":
        results = load(args.results)
        results["decision"] = args.text
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.command == "add-run":
        summary = json.loads((args.run / "summary.json").read_text())
        row = row_from_summary(summary, args.label, args.description)
    else:
        row = row_from_metadata(args.model, args.label, args.description)
    if args.conditions:
        row["conditions"] = args.conditions
    add_row(args.results, row)
    print(f"[results] {args.label} -> {args.results}\n{markdown_table(load(args.results))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
