"""Slide-level metrics from class probabilities, and their mean +- sd across folds.

AUC is binary for K = 2 and the macro one-vs-rest mean for K > 2 (over the classes that have both
positives and negatives in the fold); a fold with a single class has AUC NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC of class 1, or macro one-vs-rest AUC for K > 2; NaN when y holds fewer than two classes."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return binary_auc(y == 1, probs[:, 1])
    present = [k for k in range(probs.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean([binary_auc(y == k, probs[:, k]) for k in present]))


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic with average ranks for ties: sklearn's `roc_auc_score` value
    without its input checks, which cost milliseconds per call (the trainer calls it every epoch per fold)."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def slide_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and macro F1 of predictions argmax(probs) against labels `y`."""
    y = np.asarray(y)
    if len(y) == 0:
        return dict.fromkeys(METRICS, math.nan)
    pred = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from a fold's y_true
        return {
            "auc": auc(y, probs),
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        }


def folds_used(per_fold: Sequence[dict[str, float]]) -> dict[str, int]:
    """How many folds have a defined (finite) value of each metric: what `mean_sd` averages over."""
    return {name: int(np.isfinite(np.array([m[name] for m in per_fold], dtype=float)).sum()) for name in METRICS}


def mean_sd(per_fold: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample sd (ddof=1) of each metric over folds, ignoring NaN folds (NaN when all are NaN)."""
    mean, sd = {}, {}
    for name in METRICS:
        values = np.array([m[name] for m in per_fold], dtype=float)
        values = values[np.isfinite(values)]
        mean[name] = float(values.mean()) if len(values) else math.nan
        sd[name] = float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan)
    return mean, sd
