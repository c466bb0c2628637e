"""Cross-modal retrieval metrics on paired embeddings (row i of `queries` pairs with row i of `gallery`)."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def pair_ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1-based rank of each query's own pair among all gallery rows by cosine similarity.

    Ties count against the query (a constant embedding ranks last, not first).
    """
    sims = np.asarray(queries, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
    own = np.diag(sims)[:, None]
    return (sims >= own).sum(axis=1)


def retrieval_metrics(queries: np.ndarray, gallery: np.ndarray, ks: tuple[int, ...] = KS) -> dict:
    """top-k accuracy with its chance level (k / pool), median rank, and the pool size."""
    ranks = pair_ranks(queries, gallery)
    pool = len(gallery)
    out: dict = {"pool": pool, "median_rank": float(np.median(ranks)), "chance_median_rank": (pool + 1) / 2}
    for k in ks:
        out[f"top{k}"] = float(np.mean(ranks <= k))
        out[f"top{k}_chance"] = min(k, pool) / pool
    return out


def both_directions(fundus: np.ndarray, oct: np.ndarray, ks: tuple[int, ...] = KS) -> dict:
    return {
        "fundus_to_oct": retrieval_metrics(fundus, oct, ks),
        "oct_to_fundus": retrieval_metrics(oct, fundus, ks),
    }
