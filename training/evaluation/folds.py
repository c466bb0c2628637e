"""Patient-grouped cross-validation folds: no patient ever contributes to both sides of a split.

CST (regression) uses sklearn's GroupKFold, the binary tasks StratifiedGroupKFold, both shuffled with
the evaluation seed. Folds are assigned per task because each task has its own labelled rows.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold


class FoldError(ValueError):
    """The labelled data cannot be split as asked (too few patients or positives)."""


def assign_folds(
    patient_ids: np.ndarray, labels: np.ndarray, kind: str, n_folds: int, seed: int
) -> np.ndarray:
    """Fold index (0..n_folds-1) for each row; rows of one patient always share a fold."""
    patient_ids = np.asarray(patient_ids).astype(str)
    n_patients = len(np.unique(patient_ids))
    if n_folds < 2:
        raise FoldError(f"need at least 2 folds, got {n_folds}")
    if n_patients < n_folds:
        raise FoldError(f"{n_patients} labelled patients cannot fill {n_folds} patient-grouped folds")
    # Integer group codes in a seeded order keep the split independent of how ids sort.
    _, codes = np.unique(patient_ids, return_inverse=True)
    if kind == "binary":
        y = np.asarray(labels).astype(int)
        if len(np.unique(y)) < 2:
            raise FoldError("the label has a single class; a binary task needs both")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(y)), y, groups=codes)
    else:
        splits = _group_kfold(codes, n_folds, seed)
    fold = np.full(len(patient_ids), -1, dtype=int)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    assert (fold >= 0).all()
    return fold


def _group_kfold(codes: np.ndarray, n_folds: int, seed: int):
    try:
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    except TypeError:  # scikit-learn < 1.6 has no shuffle: permute the group codes instead
        permutation = np.random.default_rng(seed).permutation(codes.max() + 1)
        return GroupKFold(n_splits=n_folds).split(np.zeros(len(codes)), groups=permutation[codes])
    return splitter.split(np.zeros(len(codes)), groups=codes)


def patient_folds(patient_ids: np.ndarray, fold: np.ndarray) -> dict[str, int]:
    """patient -> fold; raises if a patient landed in two folds (the leakage check)."""
    mapping: dict[str, int] = {}
    for pid, k in zip(np.asarray(patient_ids).astype(str), fold, strict=True):
        if mapping.setdefault(pid, int(k)) != int(k):
            raise FoldError(f"patient {pid} is in folds {mapping[pid]} and {int(k)}")
    return mapping


def write_folds_csv(path: Path, folds_by_task: Mapping[str, Mapping[str, int]]) -> None:
    """One row per patient, one column per task (`<task>_fold`; empty when the patient has no label)."""
    tasks = list(folds_by_task)
    patients = sorted({p for mapping in folds_by_task.values() for p in mapping})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", *[f"{t}_fold" for t in tasks]])
        for pid in patients:
            writer.writerow([pid, *[folds_by_task[t].get(pid, "") for t in tasks]])


def read_folds_csv(path: Path) -> dict[str, dict[str, int]]:
    """Inverse of write_folds_csv: task -> patient -> fold."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    tasks = [c[: -len("_fold")] for c in (rows[0].keys() if rows else []) if c.endswith("_fold")]
    return {t: {r["patient_id"]: int(r[f"{t}_fold"]) for r in rows if r[f"{t}_fold"] != ""} for t in tasks}
