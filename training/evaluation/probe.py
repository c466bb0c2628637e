"""Linear probe: frozen encoder embeddings + one linear layer per task, fitted by `training.heads`.

`fit_linear_head` is the project's one head-fitting code path (the same one `retina probe` and the
exported heads use); it sees only the training folds, including when it picks a binary threshold.
The modality swap applies the head fitted on OCT embeddings to the paired fundus embeddings of the
held-out patients, and the head fitted on fundus embeddings to the paired OCT embeddings (same folds,
same threshold; the shared embedding space makes this meaningful after contrastive training).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from training.evaluation.metrics import summarise, task_metrics

SWAP_KEY = "oct_to_fundus"  # head trained on OCT embeddings, evaluated on the paired fundus embeddings
REVERSE_SWAP_KEY = "fundus_to_oct"  # head trained on fundus embeddings, evaluated on the paired OCT ones
# swap key -> (the modality the head was fitted on, the modality it is applied to)
SWAPS = {SWAP_KEY: ("oct", "fundus"), REVERSE_SWAP_KEY: ("fundus", "oct")}


def head_predict(head, embeddings: np.ndarray) -> np.ndarray:
    """The head's output in task units: µm for regression, probability for binary tasks."""
    return np.asarray(head.predict(np.asarray(embeddings, np.float64)), dtype=float)


def cross_validate_probe(
    task: str,
    kind: str,
    embeddings: Mapping[str, np.ndarray],
    labels: np.ndarray,
    fold: np.ndarray,
    seed: int,
    modalities: tuple[str, ...] = ("oct", "fundus"),
    groups: np.ndarray | None = None,
    heads_out: dict | None = None,
) -> dict[str, dict]:
    """Per-fold and summary metrics for each modality (and both modality swaps when both exist).

    `heads_out`, when given, receives the fitted head of every (modality, fold).
    """
    from training.heads import fit_linear_head

    keys = list(modalities) + (list(SWAPS) if {"oct", "fundus"} <= set(modalities) else [])
    per_fold: dict[str, list[dict]] = {k: [] for k in keys}
    for k in range(int(fold.max()) + 1):
        train, test = fold != k, fold == k
        for modality in modalities:
            head = fit_linear_head(
                task,
                embeddings[modality][train],
                labels[train],
                seed=seed,
                groups=None if groups is None else groups[train],
                input_modality=modality,
            )
            if heads_out is not None:  # fine-tuning starts from these (same fold, same rows)
                heads_out[(modality, k)] = head
            threshold = head.threshold
            prediction = head_predict(head, embeddings[modality][test])
            per_fold[modality].append(
                {"fold": k, **task_metrics(kind, labels[test], prediction, threshold)}
            )
            for key, (fitted_on, applied_to) in SWAPS.items():
                if fitted_on == modality and key in per_fold:
                    swapped = head_predict(head, embeddings[applied_to][test])
                    per_fold[key].append({"fold": k, **task_metrics(kind, labels[test], swapped, threshold)})
    return {key: {"folds": f, "summary": summarise(_metrics_only(f))} for key, f in per_fold.items()}


def _metrics_only(folds: list[dict]) -> list[dict]:
    return [{k: v for k, v in f.items() if k != "fold"} for f in folds]
