"""PNG figures a person opens: training curves, ROC, confusion matrix, samples, class balance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.data import CLASSES
from training.metrics import roc_auc, roc_curve


def _save(fig: Any, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(history: Sequence[dict[str, str]], path: Path) -> None:
    epochs = [int(r["epoch"]) + 1 for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series = (
        ("loss", "val_loss", "Loss (train weighted, val unweighted)"),
        ("accuracy", "val_accuracy", "Accuracy at 0.5"),
        (None, "val_auc", "Validation ROC AUC"),
    )
    for ax, (train_key, val_key, title) in zip(axes, series, strict=True):
        if train_key and train_key in history[0]:
            ax.plot(epochs, [float(r[train_key]) for r in history], label="train")
        ax.plot(epochs, [float(r[val_key]) for r in history], label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if "learning_rate" in history[0]:
        twin = axes[0].twinx()
        twin.plot(epochs, [float(r["learning_rate"]) for r in history], "k:", alpha=0.5)
        twin.set_yscale("log")
        twin.set_ylabel("learning rate (dotted)")
    _save(fig, path)


def roc(y_true: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str) -> None:
    fpr, tpr, _ = roc_curve(y_true, scores)
    y = np.asarray(y_true).astype(bool)
    op_tpr, op_fpr = (scores[y] >= threshold).mean(), (scores[~y] >= threshold).mean()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc(y_true, scores):.3f}")
    ax.plot([0, 1], [0, 1], "k--", alpha=0.3)
    ax.plot(
        [op_fpr],
        [op_tpr],
        "ro",
        label=f"threshold {threshold:.3f}\nsens {op_tpr:.3f}, spec {1 - op_fpr:.3f}",
    )
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def confusion_matrix(cm: dict[str, int], path: Path, title: str) -> None:
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if v > grid.max() / 2 else "black",
        )
    ax.set_xticks([0, 1], [f"pred {c}" for c in CLASSES])
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASSES])
    ax.set_title(title)
    _save(fig, path)


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    path: Path,
    seed: int = 0,
    scores: np.ndarray | None = None,
    n: int = 16,
) -> None:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), min(n, len(images)), replace=False)
    cols = 4
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8))
    for ax, i in zip(np.ravel(axes), idx, strict=False):
        ax.imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=255)
        title = CLASSES[int(labels[i])]
        if scores is not None:
            title += f"\np(PNEUMONIA)={scores[i]:.2f}"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    for ax in np.ravel(axes)[len(idx) :]:
        ax.axis("off")
    _save(fig, path)


def class_distribution(counts: dict[str, dict[str, int]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(counts)
    for k, (split, c) in enumerate(counts.items()):
        xs = np.arange(len(CLASSES)) + k * width
        bars = ax.bar(xs, [c[cls] for cls in CLASSES], width, label=split)
        ax.bar_label(bars)
    ax.set_xticks(np.arange(len(CLASSES)) + width * (len(counts) - 1) / 2, CLASSES)
    ax.set_ylabel("images")
    ax.set_title("Class distribution")
    ax.legend()
    _save(fig, path)


def calibration_curve(
    y_true: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path, n_bins: int = 10
) -> None:
    reliability(
        y_true,
        {"before": raw, "after calibration": calibrated},
        path,
        "Reliability (validation)",
        n_bins,
    )


def reliability(
    y_true: np.ndarray,
    curves: dict[str, np.ndarray],
    path: Path,
    title: str,
    n_bins: int = 10,
) -> None:
    """Observed fraction of PNEUMONIA against predicted p(PNEUMONIA), equal-width bins."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, scores in curves.items():
        bins = np.minimum((scores * n_bins).astype(int), n_bins - 1)
        xs = [scores[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ys = [np.asarray(y_true)[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ax.plot(xs, ys, "o-", label=name)
    ax.plot([0, 1], [0, 1], "k--", alpha=0.3)
    ax.set_xlabel("predicted p(PNEUMONIA)")
    ax.set_ylabel("observed fraction PNEUMONIA")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)
