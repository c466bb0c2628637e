"""Task metrics: regression (MAE, RMSE in the task's units, R²) and binary tasks (AUROC, AUPRC, balanced
accuracy). Which metrics head results.md is each task's ``metrics`` in :mod:`retinacli.tasks`.

Binary decision thresholds are always chosen on training data (`training.heads.youden_threshold` on
training-fold predictions) and only applied to the held-out fold, so no test label leaks into them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    mse = float(np.mean((y_true - y_pred) ** 2))
    r2 = float(r2_score(y_true, y_pred)) if len(y_true) > 1 and np.ptp(y_true) > 0 else None
    return {
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rmse": math.sqrt(mse),
        "r2": r2,
        "n": len(y_true),
    }


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | None]:
    """AUROC / AUPRC need both classes in the fold; otherwise they are reported as null, not faked."""
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, float)
    both = len(np.unique(y_true)) == 2
    predicted = (probability >= threshold).astype(int)
    return {
        "auroc": float(roc_auc_score(y_true, probability)) if both else None,
        "auprc": float(average_precision_score(y_true, probability)) if both else None,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, predicted)) if both else None,
        "threshold": float(threshold),
        "positive_rate": float(y_true.mean()) if len(y_true) else None,
        "n": len(y_true),
    }


def task_metrics(kind: str, y_true: np.ndarray, prediction: np.ndarray, threshold: float | None):
    if kind == "regression":
        return regression_metrics(y_true, prediction)
    return binary_metrics(y_true, prediction, 0.5 if threshold is None else threshold)


def summarise(folds: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float | int | None]]:
    """Mean and sample sd (ddof=1) of every numeric metric over folds; folds where it is null are skipped."""
    keys = [k for k in folds[0] if k not in ("n", "threshold")] if folds else []
    summary: dict[str, dict[str, float | int | None]] = {}
    for key in keys:
        values = np.array([f[key] for f in folds if f.get(key) is not None], float)
        summary[key] = {
            "mean": float(values.mean()) if len(values) else None,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n_folds": len(values),
        }
    return summary
