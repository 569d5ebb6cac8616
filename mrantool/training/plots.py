"""curves.png (train/validation loss per epoch per fold) and roc.png (test-fold ROC per fold), headless."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc as area
from sklearn.metrics import roc_curve
from sklearn.preprocessing import label_binarize

from mrantool.files import atomic_path


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=100)


def plot_curves(histories: dict[str, list[dict[str, float]]], best: dict[str, int], path: Path) -> None:
    """Slide cross-entropy per epoch, training (dashed) and validation (solid) per fold; dot = best epoch."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, (name, rows) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_ce"] for r in rows], "--", color=colour, alpha=0.7)
        ax.plot(epochs, [r["val_loss"] for r in rows], "-", color=colour, label=name)
        b = best.get(name, 0) - 1  # best epochs are 1-based
        if 0 <= b < len(rows) and np.isfinite(rows[b]["val_loss"]):
            ax.plot([b + 1], [rows[b]["val_loss"]], "o", color=colour)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("slide cross-entropy (class-weighted)")
    ax.set_title("train (dashed) and validation (solid) loss; dot = best epoch")
    if histories:
        ax.legend(fontsize="small", ncol=2)
    _save(fig, path)


def plot_roc(folds: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str], path: Path) -> None:
    """ROC of each fold's test slides: `classes[1]` vs the rest for K = 2, micro one-vs-rest for K > 2."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey")
    k = len(classes)
    for i, (name, (y, probs)) in enumerate(folds.items()):
        if len(np.unique(y)) < 2:
            ax.plot([], [], color=f"C{i % 10}", label=f"{name} (one class: no ROC)")
            continue
        if k == 2:
            fpr, tpr, _ = roc_curve(y == 1, probs[:, 1])
        else:
            fpr, tpr, _ = roc_curve(label_binarize(y, classes=range(k)).ravel(), probs.ravel())
        ax.plot(fpr, tpr, color=f"C{i % 10}", label=f"{name} (area {area(fpr, tpr):.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, positive class '{classes[1]}'" if k == 2 else "ROC, micro-average one-vs-rest")
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, path)
