"""The out-of-distribution reference a package carries (docs/model-package.md "Out-of-distribution").

Per modality, the run's cohort items are embedded with the torch model and k centroids are fitted
(scikit-learn KMeans, seeded) on the L2-normalised embeddings; an item's score is its cosine
similarity to the nearest centroid. The threshold is a low quantile of the scores of training items
that did NOT help fit the centroids (2 folds by patient, each scored by the other's centroids), so it
is not optimistic; the centroids shipped are then fitted on every item. Each modality also records
the widened training range of the preprocessed inputs' statistics (the input check).
``retinacli.ood`` applies both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.ood import (
    INPUT_FLOOR,
    INPUT_MARGIN,
    INPUT_QUANTILES,
    METHOD,
    QUANTILES,
    REFERENCE_FILE,
    REFERENCE_FORMAT,
    REFERENCE_VERSION,
    input_ranges,
    input_statistics,
)

DEFAULT_OOD_ITEMS = 1000  # cohort rows (pairs) embedded per export: enough for the quantiles, bounded cost
THRESHOLD_QUANTILE = 0.01  # 1st percentile of held-out training scores: ~1% of training-like items flagged
MIN_ITEMS = 8  # below this a quantile of held-out scores means nothing: no reference
MAX_K = 16
FOLDS = 2
SEED = 0


def choose_k(n_items: int) -> int:
    """round(sqrt(n)) between 2 and 16: never one centre, because a cohort's embeddings form groups
    (colour and NIR fundus cameras, right and left eyes) whose mean direction lies between them, where
    a noise image can sit closer than any real item (measured on the tiny test model)."""
    return int(min(MAX_K, max(2, round(math.sqrt(n_items)))))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_centroids(embeddings: np.ndarray, k: int, seed: int = SEED) -> np.ndarray:
    """k unit-norm centroids of the L2-normalised embeddings (KMeans, then each centre normalised)."""
    from sklearn.cluster import KMeans

    x = _unit(embeddings)
    k = max(1, min(k, len(np.unique(np.round(x, 6), axis=0))))  # never more centres than distinct points
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    return _unit(km.cluster_centers_)


def nearest_cosine(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity of each (normalised) embedding to its nearest centroid."""
    return np.max(_unit(embeddings) @ np.asarray(centroids, dtype=np.float64).T, axis=1)


def _folds(patients: list[str], seed: int = SEED) -> np.ndarray:
    """Fold (0/1) per item: patients shuffled (seeded) and split in two; by item with one patient."""
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    if len(unique) >= FOLDS:
        order = list(rng.permutation(len(unique)))
        fold_of = {unique[i]: rank % FOLDS for rank, i in enumerate(order)}
        return np.array([fold_of[p] for p in patients])
    return np.arange(len(patients)) % FOLDS


def modality_reference(embeddings: np.ndarray, patients: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """(the retina.json statistics, the centroids) for one modality's training embeddings."""
    n = len(embeddings)
    k = choose_k(n)
    folds = _folds(patients)
    held_out = np.empty(n, dtype=np.float64)
    for fold in range(FOLDS):
        fit, score = folds != fold, folds == fold
        held_out[score] = nearest_cosine(embeddings[score], fit_centroids(embeddings[fit], k))
    centroids = fit_centroids(embeddings, k)
    quantiles = {f"{q:g}": float(np.quantile(held_out, q)) for q in QUANTILES}
    stats = {
        "k": len(centroids),
        "threshold": float(np.quantile(held_out, THRESHOLD_QUANTILE)),
        "items": int(n),
        "patients": len(set(patients)),
        "held_out_quantiles": quantiles,
        "held_out_min": float(held_out.min()),
    }
    return stats, centroids


def input_reference(modality: str, arrays: np.ndarray) -> dict[str, Any]:
    """retina.json ``ood.modalities.<m>.inputs``: the rule and each input statistic's widened training
    range, from the training items' preprocessed arrays (retinacli.ood.input_statistics)."""
    return {"quantiles": list(INPUT_QUANTILES), "margin": INPUT_MARGIN, "floor": INPUT_FLOOR,
            "ranges": input_ranges(*input_statistics(modality, arrays))}


def build_reference(
    model: Any,
    run: Any,
    manifest: str | Path | None,
    max_items: int = DEFAULT_OOD_ITEMS,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(retina.json ``ood`` entry, reference file content), or None (and says why) when the run's cohort
    cannot be read or holds fewer than MIN_ITEMS items: a package without a reference says so at use."""
    from retinacli.cohort_manifest import read_cohort_manifest
    from training.data import load_pairs
    from training.probe import resolve_manifest_path

    say = log or (lambda _msg: None)
    try:
        manifest_path = resolve_manifest_path(run.config, Path(run.run_dir), manifest)
        rows = read_cohort_manifest(manifest_path)
        data = load_pairs(rows[:max_items], run.spec)
    except (FileNotFoundError, ValueError) as exc:
        say(f"no out-of-distribution reference: the run's cohort could not be read ({exc})")
        return None
    if len(data.rows) < MIN_ITEMS:
        say(f"no out-of-distribution reference: {len(data.rows)} readable cohort items, "
            f"at least {MIN_ITEMS} are needed")
        return None
    patients = data.patients
    entry_modalities: dict[str, Any] = {}
    file_modalities: dict[str, Any] = {}
    for modality in ("fundus", "oct"):
        arrays = data.fundus if modality == "fundus" else data.oct
        embeddings = model.encode(modality, arrays, batch_size=32)
        stats, centroids = modality_reference(embeddings, patients)
        stats["inputs"] = input_reference(modality, arrays)
        entry_modalities[modality] = stats
        file_modalities[modality] = {"k": stats["k"], "centroids": centroids.astype(np.float32).tolist()}
        say(f"out-of-distribution reference for {modality}: k={stats['k']}, threshold "
            f"{stats['threshold']:.3f} (1st percentile of {len(embeddings)} held-out training scores)")
    entry = {
        "file": REFERENCE_FILE,
        "method": METHOD,
        "source": f"{len(data.rows)} items of {manifest_path.name}",
        "folds": FOLDS,
        "threshold_quantile": THRESHOLD_QUANTILE,
        "modalities": entry_modalities,
    }
    reference = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "method": METHOD,
        "embed_dim": int(model.embed_dim),
        "modalities": file_modalities,
    }
    return entry, reference
