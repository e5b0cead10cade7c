"""The record of configurations tried: rows come from run summaries and metadata, never typed in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.support.realdata import SHIPPED_METADATA, requires_shipped_model
from training import results
from training.metrics import evaluate_scores


def _summary(seed: int, with_holdout: bool) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.5 * y + rng.random(300) * 0.6, 0, 1)
    metrics = evaluate_scores(y, s, 0.5, n_bootstrap=50)
    summary = {
        "architecture": "cxr_net",
        "parameters": 1234,
        "epochs_run": 9,
        "best_epoch": 7,
        "training_seconds": 1500.0,
        "hardware": "test",
        "validation_metrics": metrics,
    }
    if with_holdout:
        summary["holdout_metrics"] = evaluate_scores(y[:100], s[:100], 0.5, n_bootstrap=50)
    return summary


def test_a_run_row_carries_its_own_measured_figures() -> None:
    summary = _summary(0, with_holdout=True)
    row = results.row_from_summary(summary, "a", "first")
    val = summary["validation_metrics"]
    assert row["validation"]["roc_auc"] == val["roc_auc"]["value"]
    assert row["validation"]["roc_auc_ci95"] == val["roc_auc"]["ci95"]
    assert row["validation"]["specificity"] == val["specificity"]["value"]
    assert row["validation"]["sensitivity"] == val["recall"]["value"]
    assert row["holdout"]["n"] == 100
    assert row["training_minutes"] == 25.0


def test_rows_are_added_and_replaced_by_label(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    results.add_row(path, results.row_from_summary(_summary(0, True), "a", "first"))
    second = results.row_from_summary(_summary(1, False), "b", "second")
    results.add_row(path, {**second, "conditions": "on a busy machine"})
    results.add_row(path, results.row_from_summary(_summary(2, False), "a", "first, again"))
    stored = json.loads(path.read_text())
    assert stored["selection_rule"] == results.SELECTION_RULE
    assert [r["label"] for r in stored["rows"]] == ["b", "a"]
    table = results.markdown_table(stored).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| **b**: second |") and "n/a" in table[2]
    assert table[2].endswith("| 9 (7) | 25.0 min (on a busy machine) |")
    assert table[3].startswith("| **a**: first, again |")
    results.main(["--results", str(path), "decide", "--text", "b stays"])
    stored = json.loads(path.read_text())
    assert [r["label"] for r in stored["rows"]] == ["b", "a"]
    assert results.markdown_table(stored).endswith("\n\nDecision: b stays")


@requires_shipped_model
def test_the_shipped_model_row_is_read_from_its_metadata() -> None:
    row = results.row_from_metadata(SHIPPED_METADATA, "shipped", "as shipped")
    meta = json.loads(SHIPPED_METADATA.read_text())
    assert row["validation"]["roc_auc"] == meta["metrics"]["validation"]["roc_auc"]["value"]
    assert row["validation"]["ece"] == meta["metrics"]["validation"]["ece"]
    assert row["epochs_run"] == meta["provenance"]["training"]["epochs_run"]
